// The CUDA training engine (sparsa/train/cuda.h): device copies of the models, the forward and
// backward passes op by op (cuBLAS GEMMs, our kernels in kernels.cu for the rest), the losses
// and AdamW. The layouts and the order of the ops mirror src/train/model.cc line for line, so
// the two backends can be compared tensor by tensor.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.cuh"
#include "sparsa/core/error.h"
#include "sparsa/train/cuda.h"

namespace sparsa::train::cuda {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("cuda: {}: {}", what, cudaGetErrorString(e));
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    fail("cublas: {}: {}", what, cublasGetStatusString(s));
}

#define CK(call) check((call), #call)

template <typename T>
T* device_alloc(int64_t count, int64_t* total) {
  void* p = nullptr;
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("cuda: cannot allocate {:.1f} MiB on the GPU ({:.1f} GiB free of {:.1f}; {:.1f} GiB "
         "taken by the engine so far): {}",
         static_cast<double>(bytes) / (1 << 20), static_cast<double>(free_b) / (1 << 30),
         static_cast<double>(total_b) / (1 << 30), static_cast<double>(*total) / (1 << 30),
         cudaGetErrorString(e));
  }
  *total += static_cast<int64_t>(bytes);
  return static_cast<T*>(p);
}

// One model on the device: parameters (and gradients for the student), the offsets of its
// tensors, and the activations of the last forward.
struct DevModel {
  io::ModelConfig cfg;
  int64_t num_params = 0;
  float* params = nullptr;
  float* grads = nullptr;
  const float* weights = nullptr;  // what forward and backward compute with: params, or their
                                   // fake-quantized copy (quantization-aware training)
  struct Layer {
    int64_t attn_norm, wq, wk, wv, wo, mlp_norm, wgate, wup, wdown;
    int64_t bq, bk, bv, bo, bgate, bup, bdown;  // -1: absent
  };
  std::vector<Layer> layers;
  int64_t embed = 0, final_norm = 0, lm_head = 0;
  struct Acts {
    float *ln1, *rstd1, *qp, *kp, *vp, *att, *atty, *res2, *ln2, *rstd2, *gate, *up, *swi, *res3;
  };
  std::vector<Acts> acts;
  float *x0 = nullptr, *lnf = nullptr, *rstdf = nullptr, *logits = nullptr;
  std::vector<void*> act_allocs;

  void init(const Model& m, bool with_grads, int64_t* total) {
    cfg = m.config();
    num_params = m.num_params();
    auto off = [&](const std::string& name) -> int64_t {
      const ParamTensor* t = m.find(name);
      return t == nullptr ? -1 : t->offset;
    };
    auto need = [&](const std::string& name) -> int64_t {
      const int64_t o = off(name);
      SPARSA_CHECK(o >= 0, "cuda: the training model has no tensor '{}'", name);
      return o;
    };
    embed = need("model.embed_tokens.weight");
    final_norm = need("model.norm.weight");
    lm_head = cfg.tie_word_embeddings ? embed : need("lm_head.weight");
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer L;
      L.attn_norm = need(p + "input_layernorm.weight");
      L.wq = need(p + "self_attn.q_proj.weight");
      L.wk = need(p + "self_attn.k_proj.weight");
      L.wv = need(p + "self_attn.v_proj.weight");
      L.wo = need(p + "self_attn.o_proj.weight");
      L.mlp_norm = need(p + "post_attention_layernorm.weight");
      L.wgate = need(p + "mlp.gate_proj.weight");
      L.wup = need(p + "mlp.up_proj.weight");
      L.wdown = need(p + "mlp.down_proj.weight");
      L.bq = off(p + "self_attn.q_proj.bias");
      L.bk = off(p + "self_attn.k_proj.bias");
      L.bv = off(p + "self_attn.v_proj.bias");
      L.bo = off(p + "self_attn.o_proj.bias");
      L.bgate = off(p + "mlp.gate_proj.bias");
      L.bup = off(p + "mlp.up_proj.bias");
      L.bdown = off(p + "mlp.down_proj.bias");
      layers.push_back(L);
    }
    params = device_alloc<float>(num_params, total);
    CK(cudaMemcpy(params, m.params(), static_cast<size_t>(num_params) * sizeof(float),
                  cudaMemcpyHostToDevice));
    weights = params;
    if (with_grads) {
      grads = device_alloc<float>(num_params, total);
      CK(cudaMemset(grads, 0, static_cast<size_t>(num_params) * sizeof(float)));
    }
  }

  void free_acts() {
    for (void* p : act_allocs) cudaFree(p);
    act_allocs.clear();
    acts.clear();
  }

  void plan(int64_t batch, int64_t seq, int64_t* total) {
    free_acts();
    const int64_t n = batch * seq, h = cfg.hidden_size, qd = cfg.num_heads * cfg.head_dim,
                  kd = cfg.num_kv_heads * cfg.head_dim, f = cfg.intermediate_size;
    auto a = [&](int64_t count) {
      float* p = device_alloc<float>(count, total);
      act_allocs.push_back(p);
      return p;
    };
    x0 = a(n * h);
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      Acts s;
      s.ln1 = a(n * h);
      s.rstd1 = a(n);
      s.qp = a(n * qd);
      s.kp = a(n * kd);
      s.vp = a(n * kd);
      s.att = a(batch * cfg.num_heads * seq * seq);
      s.atty = a(n * qd);
      s.res2 = a(n * h);
      s.ln2 = a(n * h);
      s.rstd2 = a(n);
      s.gate = a(n * f);
      s.up = a(n * f);
      s.swi = a(n * f);
      s.res3 = a(n * h);
      acts.push_back(s);
    }
    lnf = a(n * h);
    rstdf = a(n);
    logits = a(n * cfg.vocab_size);
  }

  ~DevModel() {
    free_acts();
    if (params != nullptr) cudaFree(params);
    if (grads != nullptr) cudaFree(grads);
  }
};

}  // namespace

bool available(std::string* why) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    if (why != nullptr) *why = fmt::format("no usable CUDA device ({})", cudaGetErrorString(e));
    cudaGetLastError();  // clear the sticky error of a failed probe
    return false;
  }
  if (count == 0) {
    if (why != nullptr) *why = "no CUDA device is visible";
    return false;
  }
  return true;
}

struct Engine::Impl {
  Matmul matmul = Matmul::kBf16;
  int device = 0;
  cublasHandle_t blas = nullptr;
  int64_t allocated = 0;
  DevModel student, teacher;
  bool has_teacher = false;
  std::vector<float> inv_freq;

  // Quantization-aware training: the forward weights and the grids.
  struct FakeQuant {
    int64_t offset, rows, cols, n_groups;
    int bits;
    float *scales, *zeros;
    int32_t* g_idx;
  };
  std::vector<FakeQuant> fake_quant;
  float* fwd = nullptr;

  // Clustering-aware training: the palettes and the per-weight ∂w̃/∂w.
  struct Clustered {
    int64_t offset, rows, cols, group_rows, n_groups;
    int k;
    float* centroids;
  };
  std::vector<Clustered> clustered;
  uint32_t* counts = nullptr;  // [largest n_groups, 65536]
  float* deriv = nullptr;      // parameter layout
  double dkm_temperature = 0.2;
  int64_t dkm_iterations = 0;

  void refresh_forward(bool update_centroids) {
    if (fake_quant.empty() && clustered.empty()) return;
    CK(cudaMemcpyAsync(fwd, student.params,
                       static_cast<size_t>(student.num_params) * sizeof(float),
                       cudaMemcpyDeviceToDevice));
    for (const FakeQuant& q : fake_quant)
      kern::fake_quantize(fwd + q.offset, student.params + q.offset, q.scales, q.zeros, q.g_idx,
                          q.rows, q.cols, q.n_groups, static_cast<float>((1 << q.bits) - 1));
    for (const Clustered& c : clustered) {
      const float* w = student.params + c.offset;
      if (update_centroids && dkm_iterations > 0) {
        CK(cudaMemsetAsync(counts, 0, static_cast<size_t>(c.n_groups) * 65536 * sizeof(uint32_t)));
        kern::dkm_histogram(counts, w, c.rows, c.cols, c.group_rows);
        kern::dkm_update(c.centroids, counts, c.n_groups, c.k, dkm_temperature, dkm_iterations);
      }
      kern::dkm_apply(fwd + c.offset, deriv + c.offset, w, c.centroids, c.rows, c.cols,
                      c.group_rows, c.k, dkm_temperature);
    }
    CK(cudaGetLastError());
  }

  void free_clustering() {
    for (const Clustered& c : clustered) cudaFree(c.centroids);
    clustered.clear();
  }

  // Optimizer state and masks.
  float *m = nullptr, *v = nullptr;
  uint8_t* keep = nullptr;
  double* reduce_scratch = nullptr;  // kPartials · 2
  double* reduce_out = nullptr;      // 1

  // Scratch planned for (planned_batch, planned_seq).
  int64_t planned_batch = 0, planned_seq = 0;
  std::vector<void*> scratch;
  float *cos = nullptr, *sin = nullptr, *ones = nullptr;
  float *tmp_q = nullptr, *tmp_k = nullptr, *tmp_v = nullptr, *yp = nullptr;
  float *dlogits = nullptr, *dres = nullptr, *dln = nullptr, *dswi = nullptr, *dgate = nullptr,
        *dup = nullptr, *datty = nullptr, *datty_p = nullptr, *dp = nullptr, *dqp = nullptr,
        *dkp = nullptr, *dvp = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr,
        *norm_scratch = nullptr;
  int32_t *ids = nullptr, *targets = nullptr, *emb_uniq = nullptr, *emb_starts = nullptr,
          *emb_pos = nullptr;
  double *row_ce = nullptr, *row_kl = nullptr, *sq_loss = nullptr;
  float* sq_coef = nullptr;
  int64_t n_uniq = 0;

  cublasComputeType_t compute() const {
    return matmul == Matmul::kBf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
  }

  // Row-major C[M, N] = alpha · op(A) · op(B) + beta · C, where op(A) is [M, K] (A stored
  // [K, M] when ta) and op(B) is [K, N] (B stored [N, K] when tb); `batch` products with the
  // given element strides. cuBLAS is column-major, so it computes Cᵀ = op(B)ᵀ · op(A)ᵀ.
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
            const float* B, float beta, float* C, int64_t batch = 1, int64_t sa = 0,
            int64_t sb = 0, int64_t sc = 0) {
    SPARSA_CHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31),
                 "cuda: GEMM of {}x{}x{} exceeds cuBLAS's int dimensions", M, N, K);
    const cublasOperation_t op_b = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_a = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int ldb = static_cast<int>(tb ? K : N), lda = static_cast<int>(ta ? M : K),
              ldc = static_cast<int>(N);
    if (batch == 1) {
      CK(cublasGemmEx(blas, op_b, op_a, static_cast<int>(N), static_cast<int>(M),
                      static_cast<int>(K), &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta,
                      C, CUDA_R_32F, ldc, compute(), CUBLAS_GEMM_DEFAULT));
    } else {
      CK(cublasGemmStridedBatchedEx(blas, op_b, op_a, static_cast<int>(N), static_cast<int>(M),
                                    static_cast<int>(K), &alpha, B, CUDA_R_32F, ldb, sb, A,
                                    CUDA_R_32F, lda, sa, &beta, C, CUDA_R_32F, ldc, sc,
                                    static_cast<int>(batch), compute(), CUBLAS_GEMM_DEFAULT));
    }
  }

  // out[n, oc] = in[n, c] · w[oc, c]ᵀ (+ bias); beta 1 adds to what out holds.
  void linear(float* out, const float* in, const float* w, const float* bias, int64_t n,
              int64_t c, int64_t oc, float beta = 0.0f) {
    gemm(false, true, n, oc, c, 1.0f, in, w, beta, out);
    if (bias != nullptr) gemm(false, false, n, oc, 1, 1.0f, ones, bias, 1.0f, out);
  }

  // din (+)= dout · w, dw += doutᵀ · in, dbias += Σ_t dout[t].
  void linear_backward(float* din, float din_beta, float* dw, float* dbias, const float* dout,
                       const float* in, const float* w, int64_t n, int64_t c, int64_t oc) {
    if (din != nullptr) gemm(false, false, n, c, oc, 1.0f, dout, w, din_beta, din);
    gemm(true, false, oc, c, n, 1.0f, dout, in, 1.0f, dw);
    if (dbias != nullptr) gemm(true, false, oc, 1, n, 1.0f, dout, ones, 1.0f, dbias);
  }

  void free_scratch() {
    for (void* p : scratch) cudaFree(p);
    scratch.clear();
  }

  void plan(int64_t batch, int64_t seq) {
    if (batch <= planned_batch && seq == planned_seq) return;
    free_scratch();
    const io::ModelConfig& c = student.cfg;
    const int64_t n = batch * seq, h = c.hidden_size, qd = c.num_heads * c.head_dim,
                  kd = c.num_kv_heads * c.head_dim, f = c.intermediate_size,
                  half = c.head_dim / 2;
    student.plan(batch, seq, &allocated);
    if (has_teacher) teacher.plan(batch, seq, &allocated);
    auto a = [&](int64_t count) {
      float* p = device_alloc<float>(count, &allocated);
      scratch.push_back(p);
      return p;
    };
    auto ai = [&](int64_t count) {
      int32_t* p = device_alloc<int32_t>(count, &allocated);
      scratch.push_back(p);
      return p;
    };
    auto ad = [&](int64_t count) {
      double* p = device_alloc<double>(count, &allocated);
      scratch.push_back(p);
      return p;
    };
    const int64_t qmax = std::max(qd, has_teacher ? teacher.cfg.num_heads * teacher.cfg.head_dim : 0);
    const int64_t kmax = std::max(kd, has_teacher ? teacher.cfg.num_kv_heads * teacher.cfg.head_dim : 0);
    const int64_t hmax = std::max(h, has_teacher ? teacher.cfg.hidden_size : 0);
    const int64_t halfmax = std::max(half, has_teacher ? teacher.cfg.head_dim / 2 : 0);
    cos = a(seq * halfmax);
    sin = a(seq * halfmax);
    ones = a(n);
    kern::fill(ones, 1.0f, n);
    tmp_q = a(n * qmax);
    tmp_k = a(n * kmax);
    tmp_v = a(n * kmax);
    yp = a(n * qmax);
    dlogits = a(n * c.vocab_size);
    dres = a(n * h);
    dln = a(n * h);
    dswi = a(n * f);
    dgate = a(n * f);
    dup = a(n * f);
    datty = a(n * qd);
    datty_p = a(n * qd);
    dp = a(batch * c.num_heads * seq * seq);
    dqp = a(n * qd);
    dkp = a(n * kd);
    dvp = a(n * kd);
    dq = a(n * qd);
    dk = a(n * kd);
    dv = a(n * kd);
    norm_scratch = a(kern::rmsnorm_dw_scratch(n, hmax));
    ids = ai(n);
    targets = ai(n);
    emb_uniq = ai(n);
    emb_starts = ai(n + 1);
    emb_pos = ai(n);
    row_ce = ad(n);
    row_kl = ad(n);
    sq_loss = ad(c.num_layers);
    sq_coef = a(c.num_layers);
    planned_batch = batch;
    planned_seq = seq;
  }

  // Uploads ids (and targets), the RoPE tables and the embedding gradient's gather lists.
  void upload_batch(const int32_t* h_ids, const int32_t* h_targets, int64_t batch, int64_t seq,
                    bool gather_lists) {
    const io::ModelConfig& c = student.cfg;
    const int64_t n = batch * seq;
    for (int64_t i = 0; i < n; ++i)
      SPARSA_CHECK(h_ids[i] >= 0 && h_ids[i] < c.vocab_size,
                   "cuda: token id {} is outside the vocabulary ({})", h_ids[i], c.vocab_size);
    plan(batch, seq);
    CK(cudaMemcpy(ids, h_ids, static_cast<size_t>(n) * sizeof(int32_t), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(targets, h_targets, static_cast<size_t>(n) * sizeof(int32_t),
                  cudaMemcpyHostToDevice));
    const int64_t half = c.head_dim / 2;
    std::vector<float> hc(static_cast<size_t>(seq * half)), hs(hc.size());
    ops::rope_tables(hc.data(), hs.data(), inv_freq.data(), seq, half);
    CK(cudaMemcpy(cos, hc.data(), hc.size() * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(sin, hs.data(), hs.size() * sizeof(float), cudaMemcpyHostToDevice));
    if (!gather_lists) return;
    // Positions of every token id, ids ascending and positions ascending within an id.
    std::vector<int32_t> count(static_cast<size_t>(c.vocab_size), 0);
    for (int64_t i = 0; i < n; ++i) ++count[static_cast<size_t>(h_ids[i])];
    std::vector<int32_t> uniq, starts = {0}, first(static_cast<size_t>(c.vocab_size), -1);
    for (int64_t id = 0; id < c.vocab_size; ++id) {
      if (count[static_cast<size_t>(id)] == 0) continue;
      first[static_cast<size_t>(id)] = starts.back();
      uniq.push_back(static_cast<int32_t>(id));
      starts.push_back(starts.back() + count[static_cast<size_t>(id)]);
    }
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      pos[static_cast<size_t>(first[static_cast<size_t>(h_ids[i])]++)] = static_cast<int32_t>(i);
    n_uniq = static_cast<int64_t>(uniq.size());
    CK(cudaMemcpy(emb_uniq, uniq.data(), uniq.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(emb_starts, starts.data(), starts.size() * sizeof(int32_t),
                  cudaMemcpyHostToDevice));
    CK(cudaMemcpy(emb_pos, pos.data(), pos.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  }

  void forward(DevModel& m, int64_t batch, int64_t seq) {
    const io::ModelConfig& c = m.cfg;
    const int64_t n = batch * seq, h = c.hidden_size, nh = c.num_heads, nkv = c.num_kv_heads,
                  hd = c.head_dim, qd = nh * hd, kd = nkv * hd, f = c.intermediate_size,
                  g = nh / nkv;
    const float eps = static_cast<float>(c.rms_norm_eps);
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const float* P = m.weights;
    auto at = [P](int64_t off) { return off < 0 ? nullptr : P + off; };
    kern::embedding_forward(m.x0, ids, P + m.embed, n, h);
    const float* x = m.x0;
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const DevModel::Layer& L = m.layers[static_cast<size_t>(l)];
      const DevModel::Acts& a = m.acts[static_cast<size_t>(l)];
      kern::rmsnorm_forward(a.ln1, a.rstd1, x, P + L.attn_norm, n, h, eps);
      linear(tmp_q, a.ln1, P + L.wq, at(L.bq), n, h, qd);
      linear(tmp_k, a.ln1, P + L.wk, at(L.bk), n, h, kd);
      linear(tmp_v, a.ln1, P + L.wv, at(L.bv), n, h, kd);
      kern::rope_permute(a.qp, tmp_q, cos, sin, batch, seq, nh, hd, true);
      kern::rope_permute(a.kp, tmp_k, cos, sin, batch, seq, nkv, hd, true);
      kern::rope_permute(a.vp, tmp_v, cos, sin, batch, seq, nkv, hd, false);
      // The g query heads sharing a kv head are one [g·seq, hd] matrix in [b, nh, seq, hd].
      gemm(false, true, g * seq, seq, hd, scale, a.qp, a.kp, 0.0f, a.att, batch * nkv,
           g * seq * hd, seq * hd, g * seq * seq);
      kern::softmax_causal_forward(a.att, batch * nh * seq, seq);
      gemm(false, false, g * seq, hd, seq, 1.0f, a.att, a.vp, 0.0f, yp, batch * nkv,
           g * seq * seq, seq * hd, g * seq * hd);
      kern::unpermute_rope_backward(a.atty, yp, cos, sin, batch, seq, nh, hd, false);
      CK(cudaMemcpyAsync(a.res2, x, static_cast<size_t>(n * h) * sizeof(float),
                         cudaMemcpyDeviceToDevice));
      linear(a.res2, a.atty, P + L.wo, at(L.bo), n, qd, h, 1.0f);
      kern::rmsnorm_forward(a.ln2, a.rstd2, a.res2, P + L.mlp_norm, n, h, eps);
      linear(a.gate, a.ln2, P + L.wgate, at(L.bgate), n, h, f);
      linear(a.up, a.ln2, P + L.wup, at(L.bup), n, h, f);
      kern::swiglu_forward(a.swi, a.gate, a.up, n * f);
      CK(cudaMemcpyAsync(a.res3, a.res2, static_cast<size_t>(n * h) * sizeof(float),
                         cudaMemcpyDeviceToDevice));
      linear(a.res3, a.swi, P + L.wdown, at(L.bdown), n, f, h, 1.0f);
      x = a.res3;
    }
    kern::rmsnorm_forward(m.lnf, m.rstdf, x, P + m.final_norm, n, h, eps);
    linear(m.logits, m.lnf, P + m.lm_head, nullptr, n, h, c.vocab_size);
  }

  void backward(int64_t batch, int64_t seq, bool squarehead) {
    DevModel& m = student;
    const io::ModelConfig& c = m.cfg;
    const int64_t n = batch * seq, h = c.hidden_size, nh = c.num_heads, nkv = c.num_kv_heads,
                  hd = c.head_dim, qd = nh * hd, kd = nkv * hd, f = c.intermediate_size,
                  g = nh / nkv;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const float* P = m.weights;
    float* G = m.grads;
    auto at = [](float* base, int64_t off) { return off < 0 ? nullptr : base + off; };

    linear_backward(dln, 0.0f, G + m.lm_head, nullptr, dlogits, m.lnf, P + m.lm_head, n, h,
                    c.vocab_size);
    CK(cudaMemsetAsync(dres, 0, static_cast<size_t>(n * h) * sizeof(float)));
    const float* last = m.acts.back().res3;
    kern::rmsnorm_backward_dx(dres, dln, last, P + m.final_norm, m.rstdf, n, h);
    kern::rmsnorm_backward_dw(G + m.final_norm, norm_scratch, dln, last, m.rstdf, n, h);
    for (int64_t l = c.num_layers - 1; l >= 0; --l) {
      const DevModel::Layer& L = m.layers[static_cast<size_t>(l)];
      const DevModel::Acts& a = m.acts[static_cast<size_t>(l)];
      const float* x = l == 0 ? m.x0 : m.acts[static_cast<size_t>(l - 1)].res3;
      if (squarehead)
        kern::squarehead_grad(dres, a.res3, teacher.acts[static_cast<size_t>(l)].res3,
                              sq_coef + l, n * h);
      // MLP.
      linear_backward(dswi, 0.0f, G + L.wdown, at(G, L.bdown), dres, a.swi, P + L.wdown, n, f, h);
      kern::swiglu_backward(dgate, dup, dswi, a.gate, a.up, n * f);
      linear_backward(dln, 0.0f, G + L.wgate, at(G, L.bgate), dgate, a.ln2, P + L.wgate, n, h, f);
      linear_backward(dln, 1.0f, G + L.wup, at(G, L.bup), dup, a.ln2, P + L.wup, n, h, f);
      kern::rmsnorm_backward_dx(dres, dln, a.res2, P + L.mlp_norm, a.rstd2, n, h);
      kern::rmsnorm_backward_dw(G + L.mlp_norm, norm_scratch, dln, a.res2, a.rstd2, n, h);
      // Attention.
      linear_backward(datty, 0.0f, G + L.wo, at(G, L.bo), dres, a.atty, P + L.wo, n, qd, h);
      kern::rope_permute(datty_p, datty, cos, sin, batch, seq, nh, hd, false);
      gemm(false, true, g * seq, seq, hd, 1.0f, datty_p, a.vp, 0.0f, dp, batch * nkv,
           g * seq * hd, seq * hd, g * seq * seq);
      gemm(true, false, seq, hd, g * seq, 1.0f, a.att, datty_p, 0.0f, dvp, batch * nkv,
           g * seq * seq, g * seq * hd, seq * hd);
      kern::softmax_causal_backward(dp, a.att, batch * nh * seq, seq);
      gemm(false, false, g * seq, hd, seq, scale, dp, a.kp, 0.0f, dqp, batch * nkv,
           g * seq * seq, seq * hd, g * seq * hd);
      gemm(true, false, seq, hd, g * seq, scale, dp, a.qp, 0.0f, dkp, batch * nkv,
           g * seq * seq, g * seq * hd, seq * hd);
      kern::unpermute_rope_backward(dq, dqp, cos, sin, batch, seq, nh, hd, true);
      kern::unpermute_rope_backward(dk, dkp, cos, sin, batch, seq, nkv, hd, true);
      kern::unpermute_rope_backward(dv, dvp, cos, sin, batch, seq, nkv, hd, false);
      linear_backward(dln, 0.0f, G + L.wq, at(G, L.bq), dq, a.ln1, P + L.wq, n, h, qd);
      linear_backward(dln, 1.0f, G + L.wk, at(G, L.bk), dk, a.ln1, P + L.wk, n, h, kd);
      linear_backward(dln, 1.0f, G + L.wv, at(G, L.bv), dv, a.ln1, P + L.wv, n, h, kd);
      kern::rmsnorm_backward_dx(dres, dln, x, P + L.attn_norm, a.rstd1, n, h);
      kern::rmsnorm_backward_dw(G + L.attn_norm, norm_scratch, dln, x, a.rstd1, n, h);
    }
    kern::embedding_backward(G + m.embed, dres, emb_uniq, emb_starts, emb_pos, n_uniq, h);
  }

  std::vector<double> download_doubles(const double* p, int64_t n) {
    std::vector<double> out(static_cast<size_t>(n));
    CK(cudaMemcpy(out.data(), p, out.size() * sizeof(double), cudaMemcpyDeviceToHost));
    return out;
  }

  ~Impl() {
    free_scratch();
    for (const FakeQuant& q : fake_quant) {
      cudaFree(q.scales);
      cudaFree(q.zeros);
      cudaFree(q.g_idx);
    }
    if (fwd != nullptr) cudaFree(fwd);
    free_clustering();
    if (counts != nullptr) cudaFree(counts);
    if (deriv != nullptr) cudaFree(deriv);
    if (m != nullptr) cudaFree(m);
    if (v != nullptr) cudaFree(v);
    if (keep != nullptr) cudaFree(keep);
    if (reduce_scratch != nullptr) cudaFree(reduce_scratch);
    if (reduce_out != nullptr) cudaFree(reduce_out);
    if (blas != nullptr) cublasDestroy(blas);
  }
};

Matmul parse_matmul(const std::string& name) {
  if (name == "fp32") return Matmul::kFp32;
  if (name == "bf16") return Matmul::kBf16;
  fail("cuda: unknown GEMM precision '{}' (use bf16 or fp32)", name);
}

const char* matmul_name(Matmul m) { return m == Matmul::kBf16 ? "bf16" : "fp32"; }

Engine::Engine(const Model& student, const Model* teacher, const std::vector<uint8_t>& keep,
               Matmul matmul, int device)
    : impl_(std::make_unique<Impl>()) {
  std::string why;
  SPARSA_CHECK(available(&why), "cuda: cannot train on the GPU: {}", why);
  Impl& I = *impl_;
  I.matmul = matmul;
  I.device = device;
  CK(cudaSetDevice(device));
  CK(cublasCreate(&I.blas));
  const io::ModelConfig& c = student.config();
  SPARSA_CHECK(static_cast<int64_t>(keep.size()) == student.num_params(),
               "cuda: the mask holds {} values, the student {} parameters", keep.size(),
               student.num_params());
  I.inv_freq = student.inv_freq();
  I.student.init(student, true, &I.allocated);
  if (teacher != nullptr) {
    const io::ModelConfig& t = teacher->config();
    SPARSA_CHECK(t.vocab_size == c.vocab_size && t.head_dim == c.head_dim,
                 "cuda: the teacher's vocabulary or head size differs from the student's");
    SPARSA_CHECK(teacher->inv_freq() == I.inv_freq,
                 "cuda: the teacher's rotary embedding differs from the student's");
    I.teacher.init(*teacher, false, &I.allocated);
    I.has_teacher = true;
  }
  const int64_t np = student.num_params();
  I.m = device_alloc<float>(np, &I.allocated);
  I.v = device_alloc<float>(np, &I.allocated);
  CK(cudaMemset(I.m, 0, static_cast<size_t>(np) * sizeof(float)));
  CK(cudaMemset(I.v, 0, static_cast<size_t>(np) * sizeof(float)));
  I.keep = device_alloc<uint8_t>(np, &I.allocated);
  CK(cudaMemcpy(I.keep, keep.data(), keep.size(), cudaMemcpyHostToDevice));
  I.reduce_scratch = device_alloc<double>(2 * kern::kPartials, &I.allocated);
  I.reduce_out = device_alloc<double>(1, &I.allocated);
}

Engine::~Engine() = default;

std::string Engine::device_name() const {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, impl_->device) != cudaSuccess) return "CUDA device";
  return fmt::format("{} (sm_{}{}, {:.0f} GiB)", p.name, p.major, p.minor,
                     static_cast<double>(p.totalGlobalMem) / (1 << 30));
}

Matmul Engine::matmul() const { return impl_->matmul; }

void Engine::upload_params(const float* params) {
  CK(cudaMemcpy(impl_->student.params, params,
                static_cast<size_t>(impl_->student.num_params) * sizeof(float),
                cudaMemcpyHostToDevice));
  impl_->refresh_forward(false);
}

void Engine::set_fake_quant(const std::vector<FakeQuantTensor>& tensors) {
  Impl& I = *impl_;
  for (const Impl::FakeQuant& q : I.fake_quant) {
    cudaFree(q.scales);
    cudaFree(q.zeros);
    cudaFree(q.g_idx);
  }
  I.fake_quant.clear();
  for (const FakeQuantTensor& t : tensors) {
    SPARSA_CHECK(t.offset >= 0 && t.offset + t.rows * t.cols <= I.student.num_params &&
                     t.n_groups > 0 && t.bits >= 2 && t.bits <= 8,
                 "cuda: a fake-quantized tensor at offset {} does not fit the model", t.offset);
    Impl::FakeQuant q{t.offset, t.rows, t.cols, t.n_groups, t.bits, nullptr, nullptr, nullptr};
    const int64_t ng = t.rows * t.n_groups;
    q.scales = device_alloc<float>(ng, &I.allocated);
    q.zeros = device_alloc<float>(ng, &I.allocated);
    q.g_idx = device_alloc<int32_t>(t.cols, &I.allocated);
    I.fake_quant.push_back(q);
    CK(cudaMemcpy(q.scales, t.scales, static_cast<size_t>(ng) * sizeof(float),
                  cudaMemcpyHostToDevice));
    CK(cudaMemcpy(q.zeros, t.zeros, static_cast<size_t>(ng) * sizeof(float),
                  cudaMemcpyHostToDevice));
    CK(cudaMemcpy(q.g_idx, t.g_idx, static_cast<size_t>(t.cols) * sizeof(int32_t),
                  cudaMemcpyHostToDevice));
  }
  if (I.fake_quant.empty()) {
    if (I.clustered.empty()) I.student.weights = I.student.params;
    return;
  }
  if (I.fwd == nullptr) I.fwd = device_alloc<float>(I.student.num_params, &I.allocated);
  I.student.weights = I.fwd;
  I.refresh_forward(false);
}

void Engine::set_clustering(const std::vector<ClusteredTensor>& tensors, double temperature,
                            int64_t iterations) {
  Impl& I = *impl_;
  I.free_clustering();
  I.dkm_temperature = temperature;
  I.dkm_iterations = iterations;
  int64_t max_groups = 0;
  for (const ClusteredTensor& t : tensors) {
    SPARSA_CHECK(t.bits >= 1 && t.bits <= 4 && t.group_rows > 0 && t.offset >= 0 &&
                     t.offset + t.rows * t.cols <= I.student.num_params,
                 "cuda: clustering-aware training on the GPU takes palettes of up to 16 "
                 "entries (bits <= 4); got {} bits",
                 t.bits);
    const int64_t ng = (t.rows + t.group_rows - 1) / t.group_rows;
    const int k = 1 << t.bits;
    Impl::Clustered c{t.offset, t.rows, t.cols, t.group_rows, ng, k, nullptr};
    c.centroids = device_alloc<float>(ng * k, &I.allocated);
    I.clustered.push_back(c);
    CK(cudaMemcpy(c.centroids, t.centroids, static_cast<size_t>(ng * k) * sizeof(float),
                  cudaMemcpyHostToDevice));
    max_groups = std::max(max_groups, ng);
  }
  if (I.clustered.empty()) {
    if (I.fake_quant.empty()) I.student.weights = I.student.params;
    return;
  }
  if (I.counts != nullptr) cudaFree(I.counts);
  I.counts = device_alloc<uint32_t>(max_groups * 65536, &I.allocated);
  if (I.deriv == nullptr) I.deriv = device_alloc<float>(I.student.num_params, &I.allocated);
  if (I.fwd == nullptr) I.fwd = device_alloc<float>(I.student.num_params, &I.allocated);
  I.student.weights = I.fwd;
  I.refresh_forward(false);
}

void Engine::download_centroids(const std::vector<float*>& out) const {
  const Impl& I = *impl_;
  SPARSA_CHECK(out.size() == I.clustered.size(), "cuda: {} centroid buffers for {} tensors",
               out.size(), I.clustered.size());
  for (size_t i = 0; i < out.size(); ++i)
    CK(cudaMemcpy(out[i], I.clustered[i].centroids,
                  static_cast<size_t>(I.clustered[i].n_groups * I.clustered[i].k) * sizeof(float),
                  cudaMemcpyDeviceToHost));
}

void Engine::refresh_forward_weights(bool update_centroids) {
  impl_->refresh_forward(update_centroids);
}

void Engine::upload_keep(const uint8_t* keep) {
  CK(cudaMemcpy(impl_->keep, keep, static_cast<size_t>(impl_->student.num_params),
                cudaMemcpyHostToDevice));
}

void Engine::upload_moments(const float* m, const float* v) {
  const size_t bytes = static_cast<size_t>(impl_->student.num_params) * sizeof(float);
  CK(cudaMemcpy(impl_->m, m, bytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(impl_->v, v, bytes, cudaMemcpyHostToDevice));
}

void Engine::download_params(float* params) const {
  CK(cudaMemcpy(params, impl_->student.params,
                static_cast<size_t>(impl_->student.num_params) * sizeof(float),
                cudaMemcpyDeviceToHost));
}

void Engine::download_moments(float* m, float* v) const {
  const size_t bytes = static_cast<size_t>(impl_->student.num_params) * sizeof(float);
  CK(cudaMemcpy(m, impl_->m, bytes, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(v, impl_->v, bytes, cudaMemcpyDeviceToHost));
}

void Engine::download_grads(float* grads) const {
  CK(cudaMemcpy(grads, impl_->student.grads,
                static_cast<size_t>(impl_->student.num_params) * sizeof(float),
                cudaMemcpyDeviceToHost));
}

void Engine::zero_grad() {
  CK(cudaMemsetAsync(impl_->student.grads, 0,
                     static_cast<size_t>(impl_->student.num_params) * sizeof(float)));
}

Losses Engine::micro_batch(const int32_t* ids, const int32_t* targets, int64_t batch,
                           int64_t seq, const LossWeights& w, float grad_scale) {
  Impl& I = *impl_;
  const io::ModelConfig& c = I.student.cfg;
  SPARSA_CHECK(batch > 0 && seq > 0, "cuda: empty batch ({} x {})", batch, seq);
  SPARSA_CHECK(seq <= c.max_context(), "cuda: sequence of {} tokens exceeds the context ({})",
               seq, c.max_context());
  const bool need_teacher = w.kl > 0 || w.squarehead > 0;
  SPARSA_CHECK(!need_teacher || I.has_teacher, "cuda: distillation needs a teacher");
  SPARSA_CHECK(w.squarehead == 0 || (I.teacher.cfg.num_layers == c.num_layers &&
                                     I.teacher.cfg.hidden_size == c.hidden_size),
               "cuda: SquareHead needs student and teacher of the same depth and width");
  const int64_t n = batch * seq;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += targets[i] >= 0;
  I.upload_batch(ids, targets, batch, seq, true);
  if (need_teacher) I.forward(I.teacher, batch, seq);
  I.forward(I.student, batch, seq);
  const float ce_scale =
      count > 0 ? static_cast<float>(grad_scale * w.ce / static_cast<double>(count)) : 0.0f;
  const float kl_scale = static_cast<float>(grad_scale * w.kl * w.temperature /
                                            static_cast<double>(n));
  kern::logit_losses(I.dlogits, I.row_ce, I.row_kl, I.student.logits,
                     w.kl > 0 ? I.teacher.logits : nullptr, I.targets, n, c.vocab_size, ce_scale,
                     kl_scale, static_cast<float>(w.temperature));
  const bool sq = w.squarehead > 0;
  if (sq) {
    for (int64_t l = 0; l < c.num_layers; ++l)
      kern::squarehead(I.sq_loss + l, I.sq_coef + l, I.reduce_scratch,
                       I.student.acts[static_cast<size_t>(l)].res3,
                       I.teacher.acts[static_cast<size_t>(l)].res3, n * c.hidden_size,
                       static_cast<float>(grad_scale * w.squarehead));
  }
  I.backward(batch, seq, sq);
  CK(cudaGetLastError());
  Losses out;
  const std::vector<double> ce = I.download_doubles(I.row_ce, n);
  double s = 0;
  for (double x : ce) s += x;
  out.ce = count > 0 ? s / static_cast<double>(count) : 0.0;
  if (w.kl > 0) {
    const std::vector<double> kl = I.download_doubles(I.row_kl, n);
    double k = 0;
    for (double x : kl) k += x;
    out.kl = w.temperature * w.temperature * k / static_cast<double>(n);
  }
  if (sq) {
    const std::vector<double> l = I.download_doubles(I.sq_loss, c.num_layers);
    for (double x : l) out.squarehead += x;
  }
  return out;
}

double Engine::eval_ce_sum(const int32_t* ids, const int32_t* targets, int64_t batch,
                           int64_t seq, int64_t* count) {
  Impl& I = *impl_;
  const io::ModelConfig& c = I.student.cfg;
  SPARSA_CHECK(batch > 0 && seq > 0 && seq <= c.max_context(),
               "cuda: cannot evaluate a batch of {} x {} tokens", batch, seq);
  const int64_t n = batch * seq;
  I.upload_batch(ids, targets, batch, seq, false);
  I.forward(I.student, batch, seq);
  kern::logit_losses(nullptr, I.row_ce, I.row_kl, I.student.logits, nullptr, I.targets, n,
                     c.vocab_size, 0.0f, 0.0f, 1.0f);
  CK(cudaGetLastError());
  const std::vector<double> ce = I.download_doubles(I.row_ce, n);
  double s = 0;
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    s += ce[static_cast<size_t>(i)];
    k += targets[i] >= 0;
  }
  *count = k;
  return s;
}

double Engine::optimizer_step(const std::vector<TensorUpdate>& tensors, double clip,
                              const ops::AdamW& opt, int64_t t) {
  Impl& I = *impl_;
  float* G = I.student.grads;
  // Clustering-aware tensors: the gradient of the soft-clustered weights times ∂w̃/∂w.
  for (const Impl::Clustered& c : I.clustered)
    kern::multiply(G + c.offset, I.deriv + c.offset, c.rows * c.cols);
  for (const TensorUpdate& u : tensors)
    if (u.masked) kern::apply_mask(G + u.offset, I.keep + u.offset, u.numel);
  kern::sum_of_squares(I.reduce_out, I.reduce_scratch, G, I.student.num_params);
  double ss = 0;
  CK(cudaMemcpy(&ss, I.reduce_out, sizeof(double), cudaMemcpyDeviceToHost));
  const double norm = std::sqrt(ss);
  const float gscale = clip > 0 && norm > clip ? static_cast<float>(clip / norm) : 1.0f;
  const float c1 = 1.0f - std::pow(opt.beta1, static_cast<float>(t));
  const float c2 = 1.0f - std::pow(opt.beta2, static_cast<float>(t));
  for (const TensorUpdate& u : tensors)
    kern::adamw(I.student.params + u.offset, G + u.offset, I.m + u.offset, I.v + u.offset,
                u.masked ? I.keep + u.offset : nullptr, u.numel, opt.lr, opt.beta1, opt.beta2,
                opt.eps, u.weight_decay, c1, c2, gscale);
  CK(cudaGetLastError());
  I.refresh_forward(true);
  return norm;
}

}  // namespace sparsa::train::cuda
