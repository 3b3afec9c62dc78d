#include "sparsa/core/huge_pages.h"

#include <sys/mman.h>

#include <new>

namespace sparsa {

void HugePageDelete::operator()(uint8_t* p) const {
  ::operator delete[](p, std::align_val_t{kHugePageBytes});
}

HugePageBuffer allocate_huge_pages(size_t bytes) {
  const size_t len = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  HugePageBuffer b(static_cast<uint8_t*>(::operator new[](len, std::align_val_t{kHugePageBytes})));
  ::madvise(b.get(), len, MADV_HUGEPAGE);  // advice only: without THP the buffer still works
  return b;
}

}  // namespace sparsa
