// Token layout of one ToMe step, shared by the C++ CPU and the CUDA kernels (host and device).
//
// N tokens; the first `protected` never merge. A = non-protected even positions, B = non-protected odd
// positions; r (clamped to (N - protected) / 2) A tokens merge into B tokens. Output order:
//   [protected tokens ; unmerged A (in unm_idx order) ; every B token in original order]
// except when r = 0: then the output is the input, in its order (representative(o) = o).
// Index tensors hold absolute token positions: unm_idx [nA - r], src_idx [r], dst_idx [r] per batch.
// The spec is tome_kernels/reference.py; these functions are its integer arithmetic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TOME_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TOME_HOST_DEVICE inline
#endif

namespace tome {

TOME_HOST_DEVICE int64_t clamp_r(int64_t r, int64_t num_tokens, int64_t protected_tokens) {
  const int64_t limit = (num_tokens - protected_tokens) / 2;
  return r < 0 ? 0 : (r < limit ? r : limit);
}

// The merges a windowed match of a [num_windows, width] table makes (layout.window_r): at most one per A
// slot of the table, and at most one per A token (protected = 0).
TOME_HOST_DEVICE int64_t window_r(int64_t r, int64_t num_tokens, int64_t num_windows, int64_t width) {
  const int64_t slots = num_windows * (width / 2), num_a = (num_tokens + 1) / 2;
  const int64_t limit = slots < num_a ? slots : num_a;
  return r < 0 ? 0 : (r < limit ? r : limit);
}

struct Layout {
  int64_t num_tokens;  // N, input tokens
  int64_t protected_tokens;
  int64_t r;  // merges made (already clamped)

  TOME_HOST_DEVICE int64_t first_a() const { return protected_tokens + (protected_tokens & 1); }
  TOME_HOST_DEVICE int64_t first_b() const { return protected_tokens | 1; }
  TOME_HOST_DEVICE int64_t num_a() const {
    const int64_t n = (num_tokens - first_a() + 1) / 2;
    return n > 0 ? n : 0;
  }
  TOME_HOST_DEVICE int64_t num_b() const {
    const int64_t n = (num_tokens - first_b() + 1) / 2;
    return n > 0 ? n : 0;
  }
  TOME_HOST_DEVICE int64_t num_unmerged() const { return num_a() - r; }
  TOME_HOST_DEVICE int64_t num_out() const { return num_tokens - r; }
  // Position of the i-th A / j-th B token.
  TOME_HOST_DEVICE int64_t a_position(int64_t i) const { return first_a() + 2 * i; }
  TOME_HOST_DEVICE int64_t b_position(int64_t j) const { return first_b() + 2 * j; }
  // Which B token (0-based) sits at odd position `pos`.
  TOME_HOST_DEVICE int64_t b_slot(int64_t pos) const { return (pos - first_b()) / 2; }
  // Output index of output-order B token j, and of the B token at position `pos`.
  TOME_HOST_DEVICE int64_t b_output(int64_t j) const { return protected_tokens + num_unmerged() + j; }
  TOME_HOST_DEVICE int64_t b_output_of_position(int64_t pos) const { return b_output(b_slot(pos)); }
  // Output-order B token j of output token `o`, or -1 when `o` is a protected or unmerged A token.
  TOME_HOST_DEVICE int64_t b_of_output(int64_t o) const {
    const int64_t j = o - protected_tokens - num_unmerged();
    return j >= 0 ? j : -1;
  }
  // Whether `pos` is a valid non-protected A (even) / B (odd) position: index tensors hold nothing else.
  TOME_HOST_DEVICE bool is_a_position(int64_t pos) const {
    return pos >= first_a() && pos < num_tokens && ((pos - first_a()) & 1) == 0;
  }
  TOME_HOST_DEVICE bool is_b_position(int64_t pos) const {
    return pos >= first_b() && pos < num_tokens && ((pos - first_b()) & 1) == 0;
  }

  // The layout the ops apply: with no merges (r == 0) every op returns its input unchanged and in order
  // (reference.py), which is what this layout gives when every token counts as protected.
  TOME_HOST_DEVICE Layout effective() const { return r == 0 ? Layout{num_tokens, num_tokens, 0} : *this; }

  // Input position representing output token `o` (a merged group is represented by its B token).
  TOME_HOST_DEVICE int64_t representative(int64_t o, const int64_t* unm_idx) const {
    if (o < protected_tokens || r == 0) return o;
    const int64_t u = o - protected_tokens;
    if (u < num_unmerged()) return unm_idx[u];
    return b_position(u - num_unmerged());
  }
};

// group[i] = output token that input token i ends up in, for one batch row.
TOME_HOST_DEVICE void fill_groups(const Layout& layout, const int64_t* unm_idx, const int64_t* src_idx,
                                  const int64_t* dst_idx, int64_t* group) {
  for (int64_t o = 0; o < layout.num_out(); ++o) group[layout.representative(o, unm_idx)] = o;
  for (int64_t k = 0; k < layout.r; ++k) group[src_idx[k]] = layout.b_output_of_position(dst_idx[k]);
}

// Inverted index of one batch row: the sources merging into B token j are
// members[offsets[j] .. offsets[j + 1]), listed in src_idx order (deterministic summation order).
// offsets has num_b + 1 entries, members r entries. A counting sort: O(nB + r), no atomics.
TOME_HOST_DEVICE void invert_destinations(const Layout& layout, const int64_t* src_idx, const int64_t* dst_idx,
                                          int32_t* offsets, int64_t* members) {
  const int64_t nb = layout.num_b();
  for (int64_t j = 0; j <= nb; ++j) offsets[j] = 0;
  for (int64_t k = 0; k < layout.r; ++k) ++offsets[layout.b_slot(dst_idx[k]) + 1];
  for (int64_t j = 0; j < nb; ++j) offsets[j + 1] += offsets[j];
  // Fill with a running cursor per slot; offsets[j] is restored afterwards by the shift below.
  for (int64_t k = 0; k < layout.r; ++k) members[offsets[layout.b_slot(dst_idx[k])]++] = src_idx[k];
  for (int64_t j = nb; j > 0; --j) offsets[j] = offsets[j - 1];
  offsets[0] = 0;
}

// The same offsets and members as invert_destinations, one entry at a time, for one thread per entry
// (GPU): O(r) each, no shared cursor, so any number of threads fill them without atomics.
// offsets[j]: how many sources merge into B tokens before j.
TOME_HOST_DEVICE int64_t destination_offset(const Layout& layout, const int64_t* dst_idx, int64_t j) {
  int64_t count = 0;
  for (int64_t k = 0; k < layout.r; ++k) count += layout.b_slot(dst_idx[k]) < j;
  return count;
}

// Where source k goes in members: sources ordered by (destination B token, k).
TOME_HOST_DEVICE int64_t member_index(const Layout& layout, const int64_t* dst_idx, int64_t k) {
  const int64_t slot = layout.b_slot(dst_idx[k]);
  int64_t index = 0;
  for (int64_t m = 0; m < layout.r; ++m) {
    const int64_t other = layout.b_slot(dst_idx[m]);
    index += other < slot || (other == slot && m < k);
  }
  return index;
}

}  // namespace tome
