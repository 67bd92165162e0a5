"""The engine record: defined in the runtime (`runtime/engine_record.py`, which loads engines) and
re-exported here for the build side."""

from ..runtime.engine_record import (DECIDER, ENGINES_DIR, RECORD_KEYS, RECORD_NAME, RECORD_VERSION, DeviceInfo,
                                     check_decider, check_record, decider_source, engines_dirname, engines_path,
                                     find_engines, make_record, read_record)

__all__ = ["DECIDER", "ENGINES_DIR", "RECORD_KEYS", "RECORD_NAME", "RECORD_VERSION", "DeviceInfo", "check_decider",
           "check_record", "decider_source", "engines_dirname", "engines_path", "find_engines", "make_record", "read_record"]
