// Fused CPU kernels of the sparse decode step (one call per layer each), built with torch's
// cpp_extension on first use (kernels/cpu_ext.py). Pure-torch twins, the test oracles:
//   update_page_summaries  -> kernels/reference.py::update_page_summaries
//   quest_select           -> kernels/cpu_select.py::select_pages_reference (Quest's bound:
//                             kernels/ranking.py::quest_bound; the rescoring: ranking.py::exact_pages,
//                             the rescored dims: selection.py::rescore_dims_mask; the refresh rows:
//                             ranking.py::refresh_pages)
//   reuse_rows             -> kernels/cpu_select.py::reuse_rows_reference
//
// Cache memory (kernels/layout.py): head slot r = block * num_kv_heads + head holds
// `slot_size` elements; its page summaries start at `summary_offset`: one row
// [key min (head_size) | key max (head_size)] per page of the block. Keys are stored [head_size,
// block_size] (vLLM's vec/vec16 layout) or, with `amx`, in vLLM's AMX packing: groups of 16 tokens,
// each [head_size / 2, 16, 2] (layout.py::amx_pack).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float f32(T x) {
  return static_cast<float>(x);
}

// n elements to float32 (bf16: a shift of the bit pattern, so the loop vectorizes)
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void to_f32<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// Fold each written key into its page's min/max. Tokens of one page arrive in offset order
// within a call, so a sequential pass per head is exact: offset 0 starts the page afresh.
template <typename T>
void summaries_impl(const at::Tensor& key, const at::Tensor& slots, at::Tensor& rows, int64_t summary_offset,
                    int64_t block_size, int64_t page_size) {
  const int64_t n = key.size(0), h = key.size(1), d = key.size(2);
  const int64_t pages_per_block = block_size / page_size;
  const T* k = key.data_ptr<T>();
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1);
  const int64_t* s = slots.data_ptr<int64_t>();
  T* base = rows.data_ptr<T>();
  const int64_t rs = rows.stride(0);
#pragma omp parallel for if (n * h > 64)
  for (int64_t head = 0; head < h; ++head) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = s[t];
      if (slot < 0) continue;
      const int64_t blk = slot / block_size, off = slot % block_size;
      T* row = base + (blk * h + head) * rs + summary_offset + (off / page_size) * 2 * d;
      const T* kt = k + t * ks0 + head * ks1;
      if (off % page_size == 0) {
        for (int64_t e = 0; e < d; ++e) row[e] = row[d + e] = kt[e];
      } else {
        for (int64_t e = 0; e < d; ++e) {
          row[e] = f32(kt[e]) < f32(row[e]) ? kt[e] : row[e];
          row[d + e] = f32(kt[e]) > f32(row[d + e]) ? kt[e] : row[d + e];
        }
      }
    }
  }
}

// Max over the page's first `valid` tokens and the GQA group of q·k restricted to the `r` dims
// `dims` (all `d` dims: the exact score; fewer: SparQ's approximation from the dims of largest
// |q| x key range). Keys stored [d, BS]: dim e of the page is one contiguous row of BS keys. The r
// rows are converted once into `rows` (r * BS floats, stays in L1); each query of the group then
// accumulates its BS scores in registers (BS is a compile-time constant).
// AMX packing: dim e of token t at (t / 16) * 16 * d + (e / 2) * 32 + (t % 16) * 2 + e % 2, i.e. the
// dim pair e / 2 of token group `grp` (16 tokens) is one run of 32 elements starting here.
template <typename T>
inline const T* amx_pair_run(const T* kt, int64_t e, int64_t d, int64_t grp) {
  return kt + grp * 16 * d + (e / 2) * 32;
}
// (the AMX path is bf16-only, checked in quest_select; this generic version keeps the other dtypes compiling)
template <typename T>
inline void amx_row_f32(const T* kt, int64_t e, int64_t d, int64_t bs, float* dst) {
  for (int64_t grp = 0; grp < bs / 16; ++grp) {
    const T* src = amx_pair_run(kt, e, d, grp) + e % 2;
    for (int64_t t = 0; t < 16; ++t) dst[grp * 16 + t] = f32(src[2 * t]);
  }
}
// bf16 (the only dtype AMX packs): each token's dim pair is one 32-bit word, so dim e is its low
// (even e) or high (odd e) half moved into a float's top bits — one shift or mask, vectorized.
template <>
inline void amx_row_f32<c10::BFloat16>(const c10::BFloat16* kt, int64_t e, int64_t d, int64_t bs, float* dst) {
  const uint32_t mask = 0xFFFF0000u;
  const int shift = e % 2 ? 0 : 16;
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t grp = 0; grp < bs / 16; ++grp) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(amx_pair_run(kt, e, d, grp));
#pragma omp simd
    for (int64_t t = 0; t < 16; ++t) out[grp * 16 + t] = (w[t] << shift) & mask;
  }
}

template <typename T, int BS>
float page_score(const T* kt, const float* qsel, const int64_t* dims, int64_t g, int64_t r, int64_t valid,
                 float* rows, int64_t amx_d) {
  if (amx_d > 0) {
    for (int64_t i = 0; i < r; ++i) amx_row_f32(kt, dims[i], amx_d, BS, rows + i * BS);
  } else {
    for (int64_t i = 0; i < r; ++i) to_f32(kt + dims[i] * BS, rows + i * BS, BS);
  }
  // per token the max over the group (vector max), then one masked horizontal max per page: a
  // horizontal reduction per query cost ~0.25 ms per layer at 16 x 7k (Intel Xeon AMX VM, 2026-12-03)
  const float neg = -std::numeric_limits<float>::infinity();
  float top[BS];
#pragma omp simd
  for (int t = 0; t < BS; ++t) top[t] = neg;
  for (int64_t j = 0; j < g; ++j) {
    float a[BS] = {};
    const float* qj = qsel + j * r;
    for (int64_t i = 0; i < r; ++i) {
      const float x = qj[i];
      const float* row = rows + i * BS;
#pragma omp simd
      for (int t = 0; t < BS; ++t) a[t] += x * row[t];
    }
#pragma omp simd
    for (int t = 0; t < BS; ++t) top[t] = a[t] > top[t] ? a[t] : top[t];
  }
  for (int t = static_cast<int>(valid); t < BS; ++t) top[t] = neg;  // past the sequence's end
  float best = neg;
#pragma omp simd reduction(max : best)
  for (int t = 0; t < BS; ++t) best = std::max(best, top[t]);
  return best;
}

// amx_d: head_size when the keys are AMX-packed, else 0 ([head_size, block_size] rows)
template <typename T>
float rescore(const T* kt, const float* qsel, const int64_t* dims, int64_t g, int64_t r, int64_t bs, int64_t valid,
              float* rows, int64_t amx_d) {
  switch (bs) {
    case 16: return page_score<T, 16>(kt, qsel, dims, g, r, valid, rows, amx_d);
    case 32: return page_score<T, 32>(kt, qsel, dims, g, r, valid, rows, amx_d);
    case 64: return page_score<T, 64>(kt, qsel, dims, g, r, valid, rows, amx_d);
    case 128: return page_score<T, 128>(kt, qsel, dims, g, r, valid, rows, amx_d);
    default: TORCH_CHECK(false, "page rescoring supports block sizes 16/32/64/128, got ", bs);
  }
  return 0.f;
}

// Per (request, KV head): Quest's bound of every page, sum_e max(q_e*min_e, q_e*max_e) maxed
// over the GQA group, forced pages (sinks, window) first, then the best `count` pages; their
// one-head block ids (block * num_kv_heads + head) ascending into table[b * H + head].
template <typename T>
void quest_impl(const at::Tensor& query, const at::Tensor& rows, int64_t summary_offset, const at::Tensor& block_table,
                const at::Tensor& seq_lens, const at::Tensor& count, const at::Tensor& candidates,
                const at::Tensor& forced_lo, const at::Tensor& forced_hi, int64_t block_size, int64_t rescore_dims,
                bool amx, const uint8_t* keep, const uint8_t* prior, const int64_t* prior_cand, at::Tensor& table) {
  const int64_t b = query.size(0), nh = query.size(1), d = query.size(2);
  const int64_t h = table.size(0) / b, g = nh / h, width = table.size(1);
  const int64_t p_max = block_table.size(1);
  const T* q = query.data_ptr<T>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const T* base = rows.data_ptr<T>();
  const int64_t rs = rows.stride(0), bts = block_table.stride(0);
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t *sl = seq_lens.data_ptr<int64_t>(), *cnt = count.data_ptr<int64_t>();
  const int64_t* cand = candidates.data_ptr<int64_t>();
  const int64_t bs = block_size;
  const int64_t *lo = forced_lo.data_ptr<int64_t>(), *hi = forced_hi.data_ptr<int64_t>();
  int32_t* out = table.data_ptr<int32_t>();
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    const int64_t r_dims = rescore_dims > 0 && rescore_dims < d ? rescore_dims : d;
    std::vector<float> score(p_max), qpos(g * d), qneg(g * d), qsel(g * r_dims), weight(d), meta(2 * d);
    std::vector<float> klo(d), khi(d);  // per dim: the least min and the largest max over the scored pages
    std::vector<float> krows(r_dims * bs);  // the rescored dims of one page's keys, as float32
    std::vector<int64_t> idx(p_max), dims(d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < b * h; ++r) {
      if (keep != nullptr && keep[r]) continue;  // this row keeps the pages already in `table`
      const int64_t req = r / h, head = r % h, pages = (sl[req] + bs - 1) / bs;
      for (int64_t j = 0; j < g; ++j) {
        const T* qr = q + req * qs0 + (head * g + j) * qs1;
        for (int64_t e = 0; e < d; ++e) {
          const float x = f32(qr[e]);
          qpos[j * d + e] = x > 0.f ? x : 0.f;
          qneg[j * d + e] = x < 0.f ? x : 0.f;
        }
      }
      const int64_t k = std::min(cnt[req], pages);
      const bool refresh = prior != nullptr && prior[r];  // `table` row r holds pages selected before
      int64_t c = std::min(std::max(refresh ? prior_cand[req] : cand[req], k), pages);
      // the key range weighs the rescored dims: only tracked when stage 2 runs on fewer than every dim
      const bool track = (c > k || refresh) && r_dims < d;
      std::fill(klo.begin(), klo.end(), inf);
      std::fill(khi.begin(), khi.end(), -inf);
      constexpr int64_t kAhead = 16;  // rows sit in random blocks: keep several loads in flight
      const int64_t row_bytes = 2 * d * static_cast<int64_t>(sizeof(T));
      for (int64_t p = 0; p < std::min(pages, kAhead); ++p) {
        const char* a = reinterpret_cast<const char*>(base + (bt[req * bts + p] * h + head) * rs + summary_offset);
        for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(a + c);
      }
      for (int64_t p = 0; p < pages; ++p) {
        if (p + kAhead < pages) {
          const char* a =
              reinterpret_cast<const char*>(base + (bt[req * bts + p + kAhead] * h + head) * rs + summary_offset);
          for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(a + c);
        }
        if (p < lo[req] || p >= hi[req]) {
          score[p] = inf;
          continue;
        }
        to_f32(base + (bt[req * bts + p] * h + head) * rs + summary_offset, meta.data(), 2 * d);
        const float *mn = meta.data(), *mx = meta.data() + d;
        if (track) {
          float *lo_e = klo.data(), *hi_e = khi.data();
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) {
            lo_e[e] = mn[e] < lo_e[e] ? mn[e] : lo_e[e];
            hi_e[e] = mx[e] > hi_e[e] ? mx[e] : hi_e[e];
          }
        }
        float best = -inf;
        for (int64_t j = 0; j < g; ++j) {
          float acc = 0.f;
          const float *qp = qpos.data() + j * d, *qn = qneg.data() + j * d;
#pragma omp simd reduction(+ : acc)
          for (int64_t e = 0; e < d; ++e) acc += qn[e] * mn[e] + qp[e] * mx[e];
          best = acc > best ? acc : best;
        }
        score[p] = best;
      }
      for (int64_t p = 0; p < pages; ++p) idx[p] = p;
      auto better = [&](int64_t x, int64_t y) { return score[x] > score[y] || (score[x] == score[y] && x < y); };
      if (c > k || refresh) {
        // stage 2: rescore the best `c` pages by max q·k over the `r_dims` dims of largest group
        // |q| x key range (all dims: exact), reading only those rows of the pages' keys
        std::nth_element(idx.begin(), idx.begin() + (c - 1), idx.begin() + pages, better);
        if (refresh) {  // the pages in its table row (chosen before) join the candidates
          std::vector<int32_t> had(out + r * width, out + (r + 1) * width);
          std::sort(had.begin(), had.end());
          int64_t m = c;
          for (int64_t i = c; i < pages; ++i)
            if (std::binary_search(had.begin(), had.end(), static_cast<int32_t>(bt[req * bts + idx[i]] * h + head)))
              std::swap(idx[i], idx[m++]);
          c = m;
        }
        // weight of dim e: sum_j |q_je| x (the key range of dim e over the pages stage 1 scored),
        // how far dim e can move q.k between this context's keys (selection.rescore_dims_mask)
        const bool ranged = khi[0] >= klo[0];  // some page was scored (not only sinks/window)
        for (int64_t e = 0; e < d; ++e) {
          float w = 0.f;
          for (int64_t j = 0; j < g; ++j) w += std::abs(qpos[j * d + e] + qneg[j * d + e]);
          weight[e] = ranged ? w * (khi[e] - klo[e]) : w;
          dims[e] = e;
        }
        if (r_dims < d) {
          std::partial_sort(dims.begin(), dims.begin() + r_dims, dims.end(), [&](int64_t x, int64_t y) {
            return weight[x] > weight[y] || (weight[x] == weight[y] && x < y);
          });
          std::sort(dims.begin(), dims.begin() + r_dims);  // memory order
        }
        for (int64_t j = 0; j < g; ++j)
          for (int64_t i = 0; i < r_dims; ++i) qsel[j * r_dims + i] = qpos[j * d + dims[i]] + qneg[j * d + dims[i]];
        // The candidates sit in random blocks. Load one element of each cache line of every
        // candidate's rescored rows first: independent loads, so the core overlaps their misses
        // (16 x 7k, six layers' caches, same process: 2.45 vs 3.33 ms per layer with software
        // prefetches two pages ahead, which stalled on each miss); scoring then hits the cache.
        const int64_t row_len = bs;                                   // elements of one dim's row
        constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));  // elements per cache line
        unsigned touched = 0;  // unsigned: wraps, never overflows
        for (int64_t i = 0; i < c; ++i) {
          if (score[idx[i]] == inf) continue;
          const T* kt = base + (bt[req * bts + idx[i]] * h + head) * rs;
          if (amx) {  // dim pair e / 2 of 16 tokens: one 32-element run per token group
            for (int64_t e = 0; e < r_dims; ++e)
              for (int64_t grp = 0; grp < bs / 16; ++grp)
                for (int64_t o = 0; o < 32; o += kLine)
                  touched += reinterpret_cast<const uint8_t*>(amx_pair_run(kt, dims[e], d, grp) + o)[0];
          } else if (row_len <= kLine) {  // a row within one line (bf16 pages of 16/32): one load, no inner loop
            for (int64_t e = 0; e < r_dims; ++e) touched += reinterpret_cast<const uint8_t*>(kt + dims[e] * row_len)[0];
          } else {
            for (int64_t e = 0; e < r_dims; ++e)
              for (int64_t o = 0; o < row_len; o += kLine)
                touched += reinterpret_cast<const uint8_t*>(kt + dims[e] * row_len + o)[0];
          }
        }
        asm volatile("" : : "r"(touched));  // the loads are what counts: keep them
        for (int64_t i = 0; i < c; ++i) {
          const int64_t p = idx[i];
          if (score[p] == inf) continue;  // forced pages stay first
          const int64_t valid = std::min(bs, sl[req] - p * bs);
          score[p] = rescore(base + (bt[req * bts + p] * h + head) * rs, qsel.data(), dims.data(), g, r_dims, bs,
                             valid, krows.data(), amx ? d : 0);
        }
        std::nth_element(idx.begin(), idx.begin() + (k > 0 ? k - 1 : 0), idx.begin() + c, better);
      } else {
        std::nth_element(idx.begin(), idx.begin() + (k > 0 ? k - 1 : 0), idx.begin() + pages, better);
      }
      std::sort(idx.begin(), idx.begin() + k);
      int32_t* o = out + r * width;
      for (int64_t i = 0; i < width; ++i) {
        const int64_t p = idx[i < k ? i : k - 1];
        o[i] = static_cast<int32_t>(bt[req * bts + p] * h + head);
      }
    }
  }
}

// The rows (request, KV head) of a decode step that may keep last step's pages (`reselect_every`):
// each row's table row of the previous step (`src`), padded to `width` by repeating its last entry,
// with the request's new page where `grown_mask` says; and the `reselect_similarity` gate — a row
// keeps only while its unit query (its KV head's group of query heads, concatenated, float32)
// dotted with the one it selected with is >= `min_similarity`. Failing rows are marked `prior`
// (to refresh) when `refresh`. One call per layer for what were a dozen torch ops.
// Twin: kernels/cpu_select.py::reuse_rows_reference.
template <typename T>
void reuse_impl(const at::Tensor& query, int64_t h, const at::Tensor& prev_table, const int64_t* rows,
                const uint8_t* keep, const uint8_t* grown_mask, const int32_t* grown_new, const float* prev_ref,
                double min_similarity, at::Tensor& table, uint8_t* keep_out, uint8_t* prior, float* qn) {
  const int64_t b = query.size(0), g = query.size(1) / h, d = query.size(2);
  const int64_t n = b * h, width = table.size(1), wp = prev_table.size(1), gd = g * d;
  const T* q = query.data_ptr<T>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int32_t* pt = prev_table.data_ptr<int32_t>();
  int32_t* out = table.data_ptr<int32_t>();
  const float thr = static_cast<float>(min_similarity);
#pragma omp parallel for if (n > 64)
  for (int64_t r = 0; r < n; ++r) {
    const int64_t src = rows[r];
    const int32_t* from = pt + src * wp;
    int32_t* o = out + r * width;
    for (int64_t j = 0; j < width; ++j) o[j] = from[j < wp ? j : wp - 1];
    if (grown_mask != nullptr)
      for (int64_t j = 0; j < width; ++j)
        if (grown_mask[r * width + j]) o[j] = grown_new[r];
    bool kept = keep[r] != 0;
    if (qn != nullptr) {  // the gate: this row's unit query
      const int64_t req = r / h, head = r % h;
      float* u = qn + r * gd;
      for (int64_t k = 0; k < g; ++k) to_f32(q + req * qs0 + (head * g + k) * qs1, u + k * d, d);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t e = 0; e < gd; ++e) ss += u[e] * u[e];
      const float nrm = std::max(std::sqrt(ss), 1e-12f);  // torch.nn.functional.normalize's eps
      for (int64_t e = 0; e < gd; ++e) u[e] /= nrm;
      if (prev_ref != nullptr) {
        const float* ref = prev_ref + src * gd;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < gd; ++e) dot += u[e] * ref[e];
        const bool close = dot >= thr;
        if (prior != nullptr) prior[r] = kept && !close;
        kept = kept && close;
        if (kept) std::copy(ref, ref + gd, u);  // a kept row keeps the query it selected with
      }
    }
    keep_out[r] = kept;
  }
}

}  // namespace

void update_page_summaries(const at::Tensor& key, const at::Tensor& slots, at::Tensor rows, int64_t summary_offset,
                           int64_t block_size, int64_t page_size) {
  TORCH_CHECK(key.dim() == 3 && key.stride(2) == 1, "key must be [T, H, D] with unit last stride");
  TORCH_CHECK(key.scalar_type() == rows.scalar_type(), "key and cache dtypes differ");
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1, "rows must be [slots, slot_size]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "update_page_summaries", [&] {
    summaries_impl<scalar_t>(key, slots, rows, summary_offset, block_size, page_size);
  });
}

void quest_select(const at::Tensor& query, const at::Tensor& rows, int64_t summary_offset,
                  const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& count,
                  const at::Tensor& candidates, const at::Tensor& forced_lo, const at::Tensor& forced_hi,
                  int64_t block_size, int64_t rescore_dims, bool amx, at::Tensor table,
                  const c10::optional<at::Tensor>& keep, const c10::optional<at::Tensor>& prior,
                  const c10::optional<at::Tensor>& prior_candidates) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be [B, num_heads, D] with unit last stride");
  TORCH_CHECK(query.scalar_type() == rows.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.stride(1) == 1, "block_table: int64 rows");
  TORCH_CHECK(table.scalar_type() == at::kInt && table.is_contiguous(), "table must be contiguous int32");
  for (const auto* t : {&seq_lens, &count, &candidates, &forced_lo, &forced_hi})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "per-request counts must be contiguous int64");
  const uint8_t* keep_rows = nullptr;
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->is_contiguous() && keep->numel() == table.size(0),
                "keep: contiguous bool, one per table row");
    keep_rows = reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>());
  }
  const uint8_t* prior_rows = nullptr;
  const int64_t* prior_cand = nullptr;
  if (prior.has_value()) {
    TORCH_CHECK(prior->scalar_type() == at::kBool && prior->is_contiguous() && prior->numel() == table.size(0),
                "prior: contiguous bool, one per table row");
    TORCH_CHECK(prior_candidates.has_value() && prior_candidates->scalar_type() == at::kLong &&
                    prior_candidates->is_contiguous() && prior_candidates->numel() == query.size(0),
                "prior_candidates: contiguous int64, one per request, with prior");
    prior_rows = reinterpret_cast<const uint8_t*>(prior->data_ptr<bool>());
    prior_cand = prior_candidates->data_ptr<int64_t>();
  }
  TORCH_CHECK(!amx || (query.scalar_type() == at::kBFloat16 && block_size % 16 == 0 && query.size(2) % 32 == 0),
              "AMX packing: bfloat16, block_size % 16 == 0, head_size % 32 == 0");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "quest_select", [&] {
    quest_impl<scalar_t>(query, rows, summary_offset, block_table, seq_lens, count, candidates, forced_lo, forced_hi,
                         block_size, rescore_dims, amx, keep_rows, prior_rows, prior_cand, table);
  });
}

std::vector<at::Tensor> reuse_rows(const at::Tensor& query, int64_t num_kv_heads, const at::Tensor& prev_table,
                                   const at::Tensor& rows, const at::Tensor& keep, int64_t width,
                                   const c10::optional<at::Tensor>& grown_mask,
                                   const c10::optional<at::Tensor>& grown_new,
                                   const c10::optional<at::Tensor>& prev_ref, double min_similarity, bool refresh) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.size(1) % num_kv_heads == 0,
              "query must be [B, num_heads, D] with unit last stride, num_heads a multiple of num_kv_heads");
  const int64_t n = query.size(0) * num_kv_heads, gd = query.size(1) / num_kv_heads * query.size(2);
  TORCH_CHECK(prev_table.scalar_type() == at::kInt && prev_table.is_contiguous() && prev_table.dim() == 2 &&
                  prev_table.size(1) > 0, "prev_table: contiguous int32 [rows, width > 0]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == n,
              "rows: contiguous int64, one per (request, KV head)");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous() && keep.numel() == n,
              "keep: contiguous bool, one per (request, KV head)");
  TORCH_CHECK(width > 0, "width must be positive");
  const uint8_t* gm = nullptr;
  const int32_t* gn = nullptr;
  if (grown_mask.has_value()) {
    TORCH_CHECK(grown_mask->scalar_type() == at::kBool && grown_mask->is_contiguous() &&
                    grown_mask->numel() == n * width, "grown_mask: contiguous bool [rows, width]");
    TORCH_CHECK(grown_new.has_value() && grown_new->scalar_type() == at::kInt && grown_new->is_contiguous() &&
                    grown_new->numel() == n, "grown_new: contiguous int32, one per row, with grown_mask");
    gm = reinterpret_cast<const uint8_t*>(grown_mask->data_ptr<bool>());
    gn = grown_new->data_ptr<int32_t>();
  }
  const bool gate = min_similarity > 0;
  const float* ref = nullptr;
  if (gate && prev_ref.has_value()) {
    TORCH_CHECK(prev_ref->scalar_type() == at::kFloat && prev_ref->is_contiguous() && prev_ref->dim() == 2 &&
                    prev_ref->size(1) == gd, "prev_ref: contiguous float32 [rows, group * head_size]");
    ref = prev_ref->data_ptr<float>();
  }
  auto opts = at::TensorOptions().device(at::kCPU);
  at::Tensor table = at::empty({n, width}, opts.dtype(at::kInt));
  at::Tensor keep_out = at::empty({n}, opts.dtype(at::kBool));
  at::Tensor prior = at::empty({(refresh && ref != nullptr) ? n : 0}, opts.dtype(at::kBool));
  at::Tensor qn = at::empty({gate ? n : 0, gd}, opts.dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "reuse_rows", [&] {
    reuse_impl<scalar_t>(query, num_kv_heads, prev_table, rows.data_ptr<int64_t>(),
                         reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>()), gm, gn, ref, min_similarity, table,
                         reinterpret_cast<uint8_t*>(keep_out.data_ptr<bool>()),
                         prior.numel() ? reinterpret_cast<uint8_t*>(prior.data_ptr<bool>()) : nullptr,
                         gate ? qn.data_ptr<float>() : nullptr);
  });
  return {table, keep_out, prior, qn};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update_page_summaries", &update_page_summaries, "fold written keys into page min/max (in place)");
  m.def("quest_select", &quest_select, "Quest page selection into a compacted one-head block table",
        pybind11::arg("query"), pybind11::arg("rows"), pybind11::arg("summary_offset"), pybind11::arg("block_table"),
        pybind11::arg("seq_lens"), pybind11::arg("count"), pybind11::arg("candidates"), pybind11::arg("forced_lo"),
        pybind11::arg("forced_hi"), pybind11::arg("block_size"), pybind11::arg("rescore_dims"),
        pybind11::arg("amx"), pybind11::arg("table"), pybind11::arg("keep") = pybind11::none(),
        pybind11::arg("prior") = pybind11::none(), pybind11::arg("prior_candidates") = pybind11::none());
  m.def("reuse_rows", &reuse_rows,
        "the rows that may keep last step's pages: their table rows and the reselect_similarity gate",
        pybind11::arg("query"), pybind11::arg("num_kv_heads"), pybind11::arg("prev_table"), pybind11::arg("rows"),
        pybind11::arg("keep"), pybind11::arg("width"), pybind11::arg("grown_mask") = pybind11::none(),
        pybind11::arg("grown_new") = pybind11::none(), pybind11::arg("prev_ref") = pybind11::none(),
        pybind11::arg("min_similarity") = 0.0, pybind11::arg("refresh") = false);
}
