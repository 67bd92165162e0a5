/* What the library's custom ops share (q4_1_matmul.c registers them all): the ONNX Runtime API table and its
   KernelContext_ParallelFor (NULL on a runtime older than API version 16), set when the library is registered. */
#ifndef ADAINFER_ORT_OPS_H
#define ADAINFER_ORT_OPS_H
#include "onnxruntime_c_api.h"

#define ORT_OPS_BASE_VERSION 13
typedef OrtStatus*(ORT_API_CALL* ParallelFor)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
extern const OrtApi* ort_api;
extern ParallelFor ort_parallel_for;

/* adainfer.HeadRefine (head_refine.c) */
OrtCustomOp* head_refine_op(void);
#endif
