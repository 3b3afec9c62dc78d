#include "sparsa/core/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

namespace sparsa {

Progress::Progress(std::string label, int64_t total, std::string unit, bool enabled)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      enabled_(enabled),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

void Progress::advance(int64_t n, const std::string& extra) {
  done_ += n;
  extra_ = extra;
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (tty_) {
    if (now - last_draw_ > std::chrono::milliseconds(100) || done_ >= total_) {
      last_draw_ = now;
      draw(false);
    }
  } else if (total_ > 0) {
    const int decile = static_cast<int>(done_ * 10 / total_);
    if (decile != last_decile_) {
      last_decile_ = decile;
      draw(false);
    }
  }
}

void Progress::draw(bool final_line) {
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = secs > 0 ? static_cast<double>(done_) / secs : 0;
  const double frac = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0;
  constexpr int kWidth = 30;
  const int filled = static_cast<int>(frac * kWidth);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(kWidth, '.');
  const std::string line =
      fmt::format("{} [{}] {}/{} {:.1f} {}/s, {:.0f}s elapsed, ETA {:.0f}s{}{}", label_, bar,
                  done_, total_, rate, unit_, secs, final_line ? 0.0 : eta,
                  extra_.empty() ? "" : "  ", extra_);
  std::fputs(tty_ ? ("\r" + line + "\x1b[K").c_str() : (line + "\n").c_str(), stderr);
  if (tty_ && final_line) std::fputc('\n', stderr);
  std::fflush(stderr);
}

void Progress::finish() {
  if (finished_ || !enabled_) return;
  finished_ = true;
  if (tty_) draw(true);
}

}  // namespace sparsa
