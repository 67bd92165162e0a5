/* adainfer.HeadRefine: an ONNX Runtime custom op (CPU), the tail of a refined LM head in one node.

   A refined head (exporter/head_refine.py) scores every token with a 4-bit copy of its 8-bit table, then
   re-scores the best R at 8 bits: TopK, GatherBlockQuantized, Unsqueeze, MatMul, Squeeze, ReduceMin, Min and
   ScatterElements, eight nodes (~0.12 ms of a ~5 ms SmolLM2 int4 token, most of it per-node cost). This op
   does the same in one pass per row:

     inputs  coarse float [..., V]; x float [..., K] (the head's input); table uint8 [V, K] (8-bit codes,
             zero point 128); scales float [V, K / block_size]; count int64 [1] (R, 1..V)
     attrs   block_size
     output  logits float [..., V]: the R largest coarse logits (ties: the lower index, as ONNX Runtime's TopK)
             replaced by their exact value sum_k (table[v, k] - 128) * scales[v, k / block_size] * x[k]; every
             other one min(coarse, the lowest exact value), so the argmax is a re-scored token.

   The exact values are float sums as the graph's MatMul computes them, in another order (differences ~1e-7
   relative). Rows are split over the session's intra-op threads. Registered with adainfer.MatMulQ4_1 by
   q4_1_matmul.c (one library, runtime/q4_1_kernel.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "onnxruntime_c_api.h"
#include "ort_ops.h"
#if defined(__AVX2__) && defined(__FMA__)
#define REFINE_FAST 1
#include <immintrin.h>
#endif

typedef struct { int64_t block; } RefineKernel;

typedef struct {
  const float *coarse, *x, *scales;
  const uint8_t* table;
  float* y;
  int64_t V, K, R, block;
} RefineJob;

typedef struct { float v; int64_t i; } Entry;

/* the heap's root is its worst entry: the lowest value, and of equal values the highest index */
static int worse(Entry a, Entry b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }

static void sift_down(Entry* h, int64_t n, int64_t at) {
  for (;;) {
    int64_t l = 2 * at + 1, r = l + 1, w = at;
    if (l < n && worse(h[l], h[w])) w = l;
    if (r < n && worse(h[r], h[w])) w = r;
    if (w == at) return;
    Entry t = h[at]; h[at] = h[w]; h[w] = t;
    at = w;
  }
}

static void sift_up(Entry* h, int64_t at) {
  while (at > 0) {
    int64_t p = (at - 1) / 2;
    if (!worse(h[at], h[p])) return;
    Entry t = h[at]; h[at] = h[p]; h[p] = t;
    at = p;
  }
}

/* the R best of c[0..V): scanning in index order, a later equal value never beats the root */
static void top(const float* c, int64_t V, int64_t R, Entry* h) {
  int64_t n = 0, i = 0;
  for (; i < V && n < R; ++i) { h[n].v = c[i]; h[n].i = i; sift_up(h, n++); }
#ifdef REFINE_FAST
  for (; i + 8 <= V; i += 8) {
    if (!_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(c + i), _mm256_set1_ps(h[0].v), _CMP_GT_OQ))) continue;
    for (int64_t k = i; k < i + 8; ++k)
      if (c[k] > h[0].v) { h[0].v = c[k]; h[0].i = k; sift_down(h, R, 0); }
  }
#endif
  for (; i < V; ++i)
    if (c[i] > h[0].v) { h[0].v = c[i]; h[0].i = i; sift_down(h, R, 0); }
}

static float exact(const RefineJob* j, const float* x, int64_t v) {
  const uint8_t* q = j->table + v * j->K;
  const float* s = j->scales + v * (j->K / j->block);
  int64_t k = 0;
  float total = 0.f;
#ifdef REFINE_FAST
  if (j->block % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 zero = _mm256_set1_ps(128.f);
    for (; k + 8 <= j->K; k += 8) {
      __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k))));
      w = _mm256_mul_ps(_mm256_sub_ps(w, zero), _mm256_set1_ps(s[k / j->block]));
      acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + k), acc);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    total = _mm_cvtss_f32(h);
  }
#endif
  for (; k < j->K; ++k) total += ((float)q[k] - 128.f) * s[k / j->block] * x[k];
  return total;
}

static void refine_row(void* data, size_t row) {
  const RefineJob* j = (const RefineJob*)data;
  const float* c = j->coarse + (int64_t)row * j->V;
  const float* x = j->x + (int64_t)row * j->K;
  float* y = j->y + (int64_t)row * j->V;
  Entry* h = (Entry*)malloc((size_t)j->R * sizeof(Entry));
  if (!h) return;
  top(c, j->V, j->R, h);
  float floor = 0.f;
  for (int64_t r = 0; r < j->R; ++r) {
    h[r].v = exact(j, x, h[r].i);
    floor = r == 0 || h[r].v < floor ? h[r].v : floor;
  }
  int64_t i = 0;
#ifdef REFINE_FAST
  const __m256 f = _mm256_set1_ps(floor);
  for (; i + 8 <= j->V; i += 8) _mm256_storeu_ps(y + i, _mm256_min_ps(_mm256_loadu_ps(c + i), f));
#endif
  for (; i < j->V; ++i) y[i] = c[i] < floor ? c[i] : floor;
  for (int64_t r = 0; r < j->R; ++r) y[h[r].i] = h[r].v;
  free(h);
}

static void* ORT_API_CALL refine_create(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  (void)op;
  RefineKernel* k = (RefineKernel*)calloc(1, sizeof(RefineKernel));
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "block_size", &k->block);
  if (st) { api->ReleaseStatus(st); k->block = 0; }
  return k;
}

static void ORT_API_CALL refine_compute(void* kernel, OrtKernelContext* ctx) {
  const RefineKernel* k = (const RefineKernel*)kernel;
  const OrtValue *cv, *xv, *tv, *sv, *rv;
  CHECK(ort_api->KernelContext_GetInput(ctx, 0, &cv));
  CHECK(ort_api->KernelContext_GetInput(ctx, 1, &xv));
  CHECK(ort_api->KernelContext_GetInput(ctx, 2, &tv));
  CHECK(ort_api->KernelContext_GetInput(ctx, 3, &sv));
  CHECK(ort_api->KernelContext_GetInput(ctx, 4, &rv));
  int64_t cd[8], xd[8], td[8], sd[8], rd[8];
  size_t cr, xr, tr, sr, rr;
  if (!tensor_dims(cv, cd, &cr) || !tensor_dims(xv, xd, &xr) || !tensor_dims(tv, td, &tr) ||
      !tensor_dims(sv, sd, &sr) || !tensor_dims(rv, rd, &rr))
    return;  /* no output: ONNX Runtime reports it */
  RefineJob j;
  void* p;
  j.V = cd[cr - 1]; j.K = xd[xr - 1]; j.block = k->block;
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < cr; ++i) rows *= cd[i];
  int64_t xrows = 1;
  for (size_t i = 0; i + 1 < xr; ++i) xrows *= xd[i];
  if (tr != 2 || sr != 2 || rr != 1 || rd[0] != 1 || xrows != rows || td[0] != j.V || td[1] != j.K ||
      j.block <= 0 || j.K % j.block || sd[0] != j.V || sd[1] != j.K / j.block)
    return;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)rv, &p));
  j.R = *(const int64_t*)p;
  if (j.R < 1 || j.R > j.V) return;
  OrtValue* out;
  CHECK(ort_api->KernelContext_GetOutput(ctx, 0, cd, cr, &out));
  CHECK(ort_api->GetTensorMutableData((OrtValue*)cv, &p)); j.coarse = (const float*)p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)xv, &p)); j.x = (const float*)p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)tv, &p)); j.table = (const uint8_t*)p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)sv, &p)); j.scales = (const float*)p;
  CHECK(ort_api->GetTensorMutableData(out, &p)); j.y = (float*)p;
  OrtStatus* st = rows > 1 && ort_parallel_for ? ort_parallel_for(ctx, refine_row, (size_t)rows, 0, &j) : NULL;
  if (rows <= 1 || !ort_parallel_for || st) {
    if (st) ort_api->ReleaseStatus(st);
    for (int64_t r = 0; r < rows; ++r) refine_row(&j, (size_t)r);
  }
}

static void ORT_API_CALL refine_destroy(void* kernel) { free(kernel); }
static const char* ORT_API_CALL refine_name(const OrtCustomOp* op) { (void)op; return "HeadRefine"; }
static const char* ORT_API_CALL refine_ep(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL refine_in_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                                                              : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL refine_in_count(const OrtCustomOp* op) { (void)op; return 5; }
static ONNXTensorElementDataType ORT_API_CALL refine_out_type(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL refine_out_count(const OrtCustomOp* op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL refine_required(const OrtCustomOp* op, size_t i) {
  (void)op; (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL refine_in_mem(const OrtCustomOp* op, size_t i) {
  (void)op;
  (void)i;
  return OrtMemTypeDefault;
}

static OrtCustomOp refine_op;

OrtCustomOp* head_refine_op(void) {
  memset(&refine_op, 0, sizeof refine_op);
  refine_op.version = ORT_OPS_BASE_VERSION;
  refine_op.CreateKernel = refine_create; refine_op.GetName = refine_name; refine_op.GetExecutionProviderType = refine_ep;
  refine_op.GetInputType = refine_in_type; refine_op.GetInputTypeCount = refine_in_count;
  refine_op.GetOutputType = refine_out_type; refine_op.GetOutputTypeCount = refine_out_count;
  refine_op.KernelCompute = refine_compute; refine_op.KernelDestroy = refine_destroy;
  refine_op.GetInputCharacteristic = refine_required; refine_op.GetOutputCharacteristic = refine_required;
  refine_op.GetInputMemoryType = refine_in_mem;
  return &refine_op;
}
