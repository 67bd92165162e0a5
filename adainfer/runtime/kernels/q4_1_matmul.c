/* adainfer.MatMulQ4_1: an ONNX Runtime custom op (CPU) that multiplies by a GGUF Q4_1 matrix in one node.

   The int4 export re-encodes Q4_1 exactly as MatMulNBits on q - 8 plus a float term blocksum(x) @ (m + 8 d)
   (exporter/gguf_grid.py): four small nodes per projection group, ~1.7 ms of a ~7 ms SmolLM2 token. This
   op takes the same initializers and does both in one pass:

     inputs  x float [..., K]; B uint8 [N, K/32, 16] (MatMulNBits' 4-bit codes, low nibble first);
             scales float [N * K/32] (d); offsets float [K/32, N] (m + 8 d)
     attrs   K, N; swiglu (optional, 0 or 1)
     output  y float [..., N] = x @ W,  W[k, n] = d[n, b] * (q[k, n] - 8) + offsets[b, n],  b = k / 32
             with swiglu = 1 (W = [gate | up], N even): y float [..., N/2] = silu(x @ gate) * (x @ up), the
             MLP's Split, Sigmoid and two Muls in the same pass (a gate and its up column are computed together)

   x is rounded to int8 per block of 32 (scale max|x| / 127, round to nearest even), as MatMulNBits'
   accuracy level 4 does; the offset term uses x's float block sums, as the graph does. With AVX2, F16C
   and FMA, the first call repacks the columns four by four into one stream per quad (per pair of blocks:
   the four columns' codes, then their d and m as float16: x is loaded once for four columns) when every d
   and m is exactly a float16 (a GGUF's are); otherwise, and without AVX2, a plain C loop over the inputs as
   given. Columns are split over the session's intra-op threads (OrtApi::KernelContext_ParallelFor).

   Built and loaded by adainfer/runtime/q4_1_kernel.py (the CPU backend runs the exporter's fused twins of the
   merged graphs with it); timed by tools/q4_1_fused.py. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "onnxruntime_c_api.h"
#include "ort_ops.h"
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FAST 1
#include <immintrin.h>
#endif

#define BLK 32
#define CHUNK 32       /* output columns per parallel task (a multiple of 4): SmolLM2's 576, 960, 1536 split evenly on 2 threads */
#define QUAD_PAIR 160  /* packed, per pair of blocks: the codes of four columns (4 x 32 bytes), then each one's
                          d_b, d_b+1, m_b, m_b+1 as float16 (4 x 8 bytes) */

const OrtApi* ort_api;
/* OrtApi::KernelContext_ParallelFor is slot 274 of the function table (API version 16 on); the vendored
   header is the 1.13 one, so it is read by position (the table only ever grows). */
ParallelFor ort_parallel_for;
#define PARALLEL_FOR_SLOT 274
#define PARALLEL_FOR_VERSION 16
#define BASE_VERSION ORT_OPS_BASE_VERSION

typedef struct { int64_t K, N, swiglu; uint8_t* packed; const void* packed_from; } Kernel;

typedef struct {
  const uint8_t* q; const float* d; const float* off; const uint8_t* packed;
  const int8_t* x8; const float* sxv; const int32_t* corr; const float* bs; const float* bsv;
  float* y; int64_t rows, N, nb, pairs, out;  /* out: output columns (N, or N / 2 with swiglu) */
  int swiglu;
} Job;

/* One row of x: per pair of blocks, int8 codes [b even k | b+1 even k] [b odd k | b+1 odd k] (the order
   of MatMulNBits' nibbles), sxv = [sx_b x4, sx_b+1 x4], corr = 2 * sum(codes) per lane (four lanes make
   the zero point 8), bs = float block sums, bsv = [8 bs_b, 8 bs_b+1, bs_b, bs_b+1] (for d and m).
   An odd last block is padded with zeros. */
static void quantize_row(const float* x, int64_t nb, int8_t* x8, float* sxv, int32_t* corr, float* bs, float* bsv) {
  int64_t pairs = (nb + 1) / 2;
  memset(x8, 0, (size_t)pairs * 64);
  for (int64_t b = 0; b < 2 * pairs; ++b) {
    float scale = 0.f, sum = 0.f;
    int32_t codes = 0;
    int8_t* even = x8 + (b / 2) * 64 + (b % 2) * 16;
    int8_t* odd = even + 32;
    if (b < nb) {
      const float* xb = x + b * BLK;
      float amax = 0.f;
      for (int i = 0; i < BLK; ++i) { amax = fmaxf(amax, fabsf(xb[i])); sum += xb[i]; }
      scale = amax / 127.f;
      float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int i = 0; i < BLK / 2; ++i) {
        even[i] = (int8_t)nearbyintf(xb[2 * i] * inv);
        odd[i] = (int8_t)nearbyintf(xb[2 * i + 1] * inv);
        codes += even[i] + odd[i];
      }
      bs[b] = sum;
    }
    for (int i = 0; i < 4; ++i) { sxv[(b / 2) * 8 + (b % 2) * 4 + i] = scale; corr[(b / 2) * 8 + (b % 2) * 4 + i] = 2 * codes; }
    bsv[(b / 2) * 4 + (b % 2)] = 8.f * sum;
    bsv[(b / 2) * 4 + 2 + (b % 2)] = sum;
  }
}

/* y[n] from the inputs as given, any nb: the plain path */
static float one_column(const Job* j, int64_t n, const int8_t* x8, const float* sxv, const int32_t* corr, const float* bs) {
  float total = 0.f;
  for (int64_t b = 0; b < j->nb; ++b) {
    const uint8_t* q = j->q + (n * j->nb + b) * 16;
    const int8_t* even = x8 + (b / 2) * 64 + (b % 2) * 16;
    const int8_t* odd = even + 32;
    int32_t dot = -4 * corr[(b / 2) * 8 + (b % 2) * 4];
    for (int i = 0; i < BLK / 2; ++i) dot += (q[i] & 0x0F) * even[i] + (q[i] >> 4) * odd[i];
    total += (float)dot * j->d[n * j->nb + b] * sxv[(b / 2) * 8 + (b % 2) * 4] + bs[b] * j->off[b * j->N + n];
  }
  return total;
}

#ifdef FAST
/* The four columns packed together as quad `quad`: 4q .. 4q + 3 (the last one repeated past N); with swiglu the
   gates 2q, 2q + 1 and their up columns 2q + out, 2q + 1 + out (2q repeated past out). */
static void quad_columns(const Job* j, int64_t quad, int64_t cols[4]) {
  if (j->swiglu) {
    int64_t a = 2 * quad, b = a + 1 < j->out ? a + 1 : a;
    cols[0] = a; cols[1] = b; cols[2] = a + j->out; cols[3] = b + j->out;
  } else {
    for (int i = 0; i < 4; ++i) cols[i] = 4 * quad + i < j->N ? 4 * quad + i : j->N - 1;
  }
}

static int64_t quads(const Job* j) { return j->swiglu ? (j->out + 1) / 2 : (j->N + 3) / 4; }

/* y[0..3] for the four columns of one packed quad: x's int8 codes and scales are loaded once per pair of blocks
   for all four */
static inline void quad_packed(const uint8_t* s, int64_t pairs, const int8_t* x8, const float* sxv,
                               const int32_t* corr, const float* bsv, float* y) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  __m128 off[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t* a = s + p * QUAD_PAIR;
    _mm_prefetch((const char*)(a + 4 * QUAD_PAIR), _MM_HINT_T0);
    _mm_prefetch((const char*)(a + 4 * QUAD_PAIR + 64), _MM_HINT_T0);
    _mm_prefetch((const char*)(a + 4 * QUAD_PAIR + 128), _MM_HINT_T0);
    const __m256i xe = _mm256_load_si256((const __m256i*)(x8 + p * 64));
    const __m256i xo = _mm256_load_si256((const __m256i*)(x8 + p * 64 + 32));
    const __m256i c = _mm256_load_si256((const __m256i*)(corr + p * 8));
    const __m256 sx = _mm256_load_ps(sxv + p * 8);
    const __m128 bs = _mm_load_ps(bsv + p * 4);
    for (int i = 0; i < 4; ++i) {
      const __m256i r = _mm256_loadu_si256((const __m256i*)(a + 32 * i));
      const __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(a + 128 + 8 * i)));  /* d_b, d_b+1, m_b, m_b+1 */
      __m256i dot = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(r, mask), xe),
                                     _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(r, 4), mask), xo));
      dot = _mm256_sub_epi32(_mm256_madd_epi16(dot, ones), c);
      const __m256 scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), lanes), sx);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i]);
      off[i] = _mm_fmadd_ps(f, bs, off[i]);  /* (m + 8 d) . blocksum */
    }
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m128 o = _mm_hadd_ps(_mm_hadd_ps(off[0], off[1]), _mm_hadd_ps(off[2], off[3]));
  _mm_storeu_ps(y, _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), o));
}

/* the packed copy, or NULL when some d or m is not exactly a float16 */
static uint8_t* pack(const Job* j) {
  size_t stride = (size_t)j->pairs * QUAD_PAIR;
  uint8_t* out = (uint8_t*)aligned_alloc(64, ((size_t)quads(j) * stride + 63) & ~(size_t)63);
  for (int64_t quad = 0; quad < quads(j); ++quad) {
    int64_t cols[4];
    quad_columns(j, quad, cols);
    for (int64_t p = 0; p < j->pairs; ++p)
      for (int i = 0; i < 4; ++i) {
        int64_t n = cols[i];
        uint8_t* dst = out + quad * stride + p * QUAD_PAIR;
        float d0 = j->d[n * j->nb + 2 * p], d1 = j->d[n * j->nb + 2 * p + 1];
        float f[4] = {d0, d1, j->off[(2 * p) * j->N + n] - 8.f * d0, j->off[(2 * p + 1) * j->N + n] - 8.f * d1};
        __m128i h = _mm_cvtps_ph(_mm_loadu_ps(f), _MM_FROUND_TO_NEAREST_INT);
        float back[4];
        _mm_storeu_ps(back, _mm_cvtph_ps(h));
        if (memcmp(back, f, sizeof f)) { free(out); return NULL; }
        memcpy(dst + 32 * i, j->q + (n * j->nb + 2 * p) * 16, 32);
        _mm_storel_epi64((__m128i*)(dst + 128 + 8 * i), h);
      }
  }
  return out;
}
#endif

#ifdef FAST
/* expf of 8 values, Cephes-style (range reduction by ln 2, degree-6 polynomial: relative error ~1e-7) */
static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* g = g * sigmoid(g) * u over n values (SiLU of the gate times the up projection) */
static void apply_swiglu(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#ifdef FAST
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(g + i);
    __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

static void work(void* data, size_t index) {
  const Job* j = (const Job*)data;
  int64_t n0 = (int64_t)index * CHUNK, n1 = n0 + CHUNK < j->out ? n0 + CHUNK : j->out;
  float up[CHUNK];
  for (int64_t r = 0; r < j->rows; ++r) {
    const int8_t* x8 = j->x8 + r * j->pairs * 64;
    const float* sxv = j->sxv + r * j->pairs * 8;
    const int32_t* corr = j->corr + r * j->pairs * 8;
    float* y = j->y + r * j->out;
    int64_t n = n0;
#ifdef FAST
    if (j->packed) {
      const float* bsv = j->bsv + r * j->pairs * 4;
      size_t stride = (size_t)j->pairs * QUAD_PAIR;
      int64_t per = j->swiglu ? 2 : 4;  /* output columns per quad (CHUNK is a multiple of 4) */
      for (; n < n1; n += per) {
        float t[4];
        quad_packed(j->packed + (n / per) * stride, j->pairs, x8, sxv, corr, bsv, t);
        for (int64_t i = 0; i < per && n + i < n1; ++i) {
          y[n + i] = t[i];
          if (j->swiglu) up[n + i - n0] = t[2 + i];
        }
      }
      n = n1;
    }
#endif
    for (; n < n1; ++n) {
      y[n] = one_column(j, n, x8, sxv, corr, j->bs + r * j->pairs * 2);
      if (j->swiglu) up[n - n0] = one_column(j, n + j->out, x8, sxv, corr, j->bs + r * j->pairs * 2);
    }
    if (j->swiglu) apply_swiglu(y + n0, up, n1 - n0);
  }
}

static void* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  (void)op;
  Kernel* k = (Kernel*)calloc(1, sizeof(Kernel));
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, "K", &k->K);
  if (!st) st = api->KernelInfoGetAttribute_int64(info, "N", &k->N);
  if (st) { api->ReleaseStatus(st); k->K = k->N = 0; }
  if ((st = api->KernelInfoGetAttribute_int64(info, "swiglu", &k->swiglu))) { api->ReleaseStatus(st); k->swiglu = 0; }
  return k;
}

static void ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  Kernel* k = (Kernel*)kernel;
  const OrtValue *a, *qv, *dv, *ov;
  CHECK(ort_api->KernelContext_GetInput(ctx, 0, &a));
  CHECK(ort_api->KernelContext_GetInput(ctx, 1, &qv));
  CHECK(ort_api->KernelContext_GetInput(ctx, 2, &dv));
  CHECK(ort_api->KernelContext_GetInput(ctx, 3, &ov));
  size_t rank = 0;
  int64_t dims[8];
  if (!tensor_dims(a, dims, &rank)) return;
  if (rank < 1 || rank > 8 || dims[rank - 1] != k->K || k->K % BLK || (k->swiglu && k->N % 2)) return;  /* no output: ORT reports it */
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < rank; ++i) rows *= dims[i];
  dims[rank - 1] = k->swiglu ? k->N / 2 : k->N;
  OrtValue* out;
  CHECK(ort_api->KernelContext_GetOutput(ctx, 0, dims, rank, &out));
  Job j;
  void* p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)a, &p)); const float* x = (const float*)p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)qv, &p)); j.q = (const uint8_t*)p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)dv, &p)); j.d = (const float*)p;
  CHECK(ort_api->GetTensorMutableData((OrtValue*)ov, &p)); j.off = (const float*)p;
  CHECK(ort_api->GetTensorMutableData(out, &p)); j.y = (float*)p;
  j.rows = rows; j.N = k->N; j.nb = k->K / BLK; j.pairs = (j.nb + 1) / 2; j.packed = NULL;
  j.swiglu = k->swiglu != 0; j.out = j.swiglu ? k->N / 2 : k->N;
  if (rows == 0 || k->N == 0) return;
  size_t x8_bytes = (size_t)(rows * j.pairs * 64), lanes = (size_t)(rows * j.pairs * 8);
  size_t bytes = x8_bytes + 2 * lanes * 4 + (size_t)(rows * j.pairs * 4) * 4 + (size_t)(rows * j.pairs * 2) * 4;
  char* buf = (char*)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
  if (!buf) return;
  int8_t* x8 = (int8_t*)buf;
  float* sxv = (float*)(buf + x8_bytes);
  int32_t* corr = (int32_t*)(sxv + lanes);
  float* bsv = (float*)(corr + lanes);
  float* bs = bsv + rows * j.pairs * 4;
  for (int64_t r = 0; r < rows; ++r)
    quantize_row(x + r * k->K, j.nb, x8 + r * j.pairs * 64, sxv + r * j.pairs * 8, corr + r * j.pairs * 8,
                 bs + r * j.pairs * 2, bsv + r * j.pairs * 4);
  j.x8 = x8; j.sxv = sxv; j.corr = corr; j.bs = bs; j.bsv = bsv;
#ifdef FAST
  if (j.nb % 2 == 0) {  /* packs whole pairs of blocks */
    if (k->packed_from != (const void*)j.q) {
      free(k->packed);
      k->packed = pack(&j);
      k->packed_from = j.q;
    }
    j.packed = k->packed;
  }
#endif
  size_t tasks = (size_t)((j.out + CHUNK - 1) / CHUNK);
  OrtStatus* st = ort_parallel_for ? ort_parallel_for(ctx, work, tasks, 0, &j) : NULL;
  if (!ort_parallel_for || st) {
    if (st) ort_api->ReleaseStatus(st);
    for (size_t i = 0; i < tasks; ++i) work(&j, i);
  }
  free(buf);
}

static void ORT_API_CALL destroy(void* kernel) { free(((Kernel*)kernel)->packed); free(kernel); }
static const char* ORT_API_CALL op_name(const OrtCustomOp* op) { (void)op; return "MatMulQ4_1"; }
static const char* ORT_API_CALL op_ep(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static ONNXTensorElementDataType ORT_API_CALL in_type(const OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL in_count(const OrtCustomOp* op) { (void)op; return 4; }
static ONNXTensorElementDataType ORT_API_CALL out_type(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
static size_t ORT_API_CALL out_count(const OrtCustomOp* op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return INPUT_OUTPUT_REQUIRED; }
static OrtMemType ORT_API_CALL in_mem(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return OrtMemTypeDefault; }

static OrtCustomOp op;

OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* newer = base->GetApi(PARALLEL_FOR_VERSION);
  ort_api = newer ? newer : base->GetApi(BASE_VERSION);
  if (!ort_api) return NULL;
  ort_parallel_for = newer ? (ParallelFor)((void* const*)newer)[PARALLEL_FOR_SLOT] : NULL;
  memset(&op, 0, sizeof op);
  op.version = BASE_VERSION;
  op.CreateKernel = create_kernel; op.GetName = op_name; op.GetExecutionProviderType = op_ep;
  op.GetInputType = in_type; op.GetInputTypeCount = in_count; op.GetOutputType = out_type; op.GetOutputTypeCount = out_count;
  op.KernelCompute = compute; op.KernelDestroy = destroy;
  op.GetInputCharacteristic = required; op.GetOutputCharacteristic = required; op.GetInputMemoryType = in_mem;
  OrtCustomOpDomain* domain;
  OrtStatus* st = ort_api->CreateCustomOpDomain("adainfer", &domain);
  if (st) return st;
  if ((st = ort_api->CustomOpDomain_Add(domain, &op))) return st;
  if ((st = ort_api->CustomOpDomain_Add(domain, head_refine_op()))) return st;
  return ort_api->AddCustomOpDomain(options, domain);
}
