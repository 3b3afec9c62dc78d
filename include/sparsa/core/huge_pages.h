// Memory for large buffers that are read as streams (weights read in with --no-mmap, the
// bandwidth probe): aligned to 2 MiB and advised for transparent huge pages, so that a sequential
// read crosses few page (TLB) boundaries.
//
//   sparsa::HugePageBuffer buf = sparsa::allocate_huge_pages(n);   // n rounded up to 2 MiB
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace sparsa {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;

struct HugePageDelete {
  void operator()(uint8_t* p) const;
};
using HugePageBuffer = std::unique_ptr<uint8_t[], HugePageDelete>;

/// At least `bytes` (rounded up to whole 2 MiB pages), uninitialised; throws std::bad_alloc.
HugePageBuffer allocate_huge_pages(size_t bytes);

}  // namespace sparsa
