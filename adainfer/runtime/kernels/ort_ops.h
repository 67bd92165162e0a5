/* What the library's custom ops share (q4_1_matmul.c registers them all): the ONNX Runtime API table and its
   KernelContext_ParallelFor (NULL on a runtime older than API version 16), set when the library is registered; a
   status check that returns from a kernel; a tensor's shape. */
#ifndef ADAINFER_ORT_OPS_H
#define ADAINFER_ORT_OPS_H
#include "onnxruntime_c_api.h"

#define ORT_OPS_BASE_VERSION 13
typedef OrtStatus*(ORT_API_CALL* ParallelFor)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
extern const OrtApi* ort_api;
extern ParallelFor ort_parallel_for;

/* a kernel returns without its output when a call fails: ONNX Runtime then reports the missing output */
#define CHECK(expr) do { OrtStatus* st_ = (expr); if (st_) { ort_api->ReleaseStatus(st_); return; } } while (0)

/* dims and rank (1..8) of a tensor; 0 where they cannot be read or the rank is outside 1..8 */
static inline int tensor_dims(const OrtValue* v, int64_t* dims, size_t* rank) {
  OrtTensorTypeAndShapeInfo* info;
  OrtStatus* st = ort_api->GetTensorTypeAndShape(v, &info);
  if (st) { ort_api->ReleaseStatus(st); return 0; }
  st = ort_api->GetDimensionsCount(info, rank);
  if (!st && *rank >= 1 && *rank <= 8) st = ort_api->GetDimensions(info, dims, *rank);
  ort_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) { ort_api->ReleaseStatus(st); return 0; }
  return *rank >= 1 && *rank <= 8;
}

/* adainfer.HeadRefine (head_refine.c) */
OrtCustomOp* head_refine_op(void);
#endif
