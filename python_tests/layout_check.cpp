// Checks csrc/include/tome/layout.h against brute-force definitions on random layouts and index triples.
// Built and run by test_cuda_backend.py (g++ -std=c++20 -I csrc/include); prints "ok" or the first mismatch.
#include <tome/layout.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

namespace {

int fail(const char* what, int64_t n, int64_t p, int64_t r) {
  std::printf("mismatch: %s (N=%lld protected=%lld r=%lld)\n", what, static_cast<long long>(n),
              static_cast<long long>(p), static_cast<long long>(r));
  return 1;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t n = rng() % 40, p = rng() % (n + 1);
    const tome::Layout layout{n, p, tome::clamp_r(static_cast<int64_t>(rng() % (n + 2)), n, p)};
    std::vector<int64_t> a, b;
    for (int64_t pos = p; pos < n; ++pos) (pos % 2 == 0 ? a : b).push_back(pos);
    if (layout.num_a() != static_cast<int64_t>(a.size()) || layout.num_b() != static_cast<int64_t>(b.size()))
      return fail("num_a / num_b", n, p, layout.r);
    for (int64_t pos = 0; pos < n; ++pos) {
      if (layout.is_a_position(pos) != (std::find(a.begin(), a.end(), pos) != a.end()))
        return fail("is_a_position", n, p, layout.r);
      if (layout.is_b_position(pos) != (std::find(b.begin(), b.end(), pos) != b.end()))
        return fail("is_b_position", n, p, layout.r);
    }
    // A random matching: a shuffled split of the A tokens, random destinations (collisions included).
    std::shuffle(a.begin(), a.end(), rng);
    const std::vector<int64_t> src(a.begin(), a.begin() + layout.r), unm(a.begin() + layout.r, a.end());
    std::vector<int64_t> dst(layout.r);
    for (int64_t& d : dst) d = b[rng() % b.size()];

    std::vector<int32_t> offsets(layout.num_b() + 1);
    std::vector<int64_t> members(layout.r);
    tome::invert_destinations(layout, src.data(), dst.data(), offsets.data(), members.data());
    for (int64_t j = 0; j <= layout.num_b(); ++j)
      if (tome::destination_offset(layout, dst.data(), j) != offsets[j])
        return fail("destination_offset", n, p, layout.r);
    for (int64_t k = 0; k < layout.r; ++k)
      if (members[tome::member_index(layout, dst.data(), k)] != src[k]) return fail("member_index", n, p, layout.r);

    for (int64_t o = 0; o < layout.num_out(); ++o) {
      const int64_t expected = o >= p + layout.num_unmerged() ? o - p - layout.num_unmerged() : -1;
      if (layout.b_of_output(o) != expected) return fail("b_of_output", n, p, layout.r);
    }
    // r == 0: the effective layout keeps every token in place.
    const tome::Layout effective = layout.effective();
    std::vector<int64_t> group(n, -1);
    tome::fill_groups(effective, layout.r == 0 ? nullptr : unm.data(), src.data(), dst.data(), group.data());
    for (int64_t i = 0; i < n; ++i) {
      if (group[i] < 0) return fail("fill_groups covers every token", n, p, layout.r);
      if (layout.r == 0 && group[i] != i) return fail("effective() is the identity for r == 0", n, p, layout.r);
    }
  }
  std::printf("ok\n");
  return 0;
}
