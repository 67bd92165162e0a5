"""onnxruntime-genai as a timing peer, driven over stdin/stdout by tools/chain_vs_genai.py.

Runs under the peers' Python (the one with onnxruntime_genai installed):

    PEER_PYTHON tools/genai_peer.py MODEL_DIR --threads 2

Each request line is JSON {"ids": [...], "tokens": N}; the answer line is JSON with the prefill
seconds (prompt -> first token), the decode seconds per token (N one-token forwards after the
first token, each choosing the next one, as our chain's `Model.step`) and the N + 1 generated ids.
{"rss": true} answers the process's peak resident set (VmHWM, MB). Greedy: do_sample false.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    import onnxruntime_genai as og

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    config = og.Config(args.model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("rss"):
            print(json.dumps({"peak_mb": peak_mb()}), flush=True)
            continue
        ids, tokens = request["ids"], request["tokens"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens + 2, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()  # the prompt's forward and the first new token (no forward of it yet)
        prefill = time.perf_counter() - started
        out = [int(generator.get_next_tokens()[0])]
        started = time.perf_counter()
        for _ in range(tokens):  # each: the forward of the previous token, then choosing the next
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        decode = (time.perf_counter() - started) / tokens
        del generator
        print(json.dumps({"prefill_s": prefill, "decode_s_per_token": decode, "tokens": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
