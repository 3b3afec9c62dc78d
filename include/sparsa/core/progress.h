// A progress bar on stderr with rate and ETA. On a terminal it redraws one line; otherwise it
// prints a line every 10%.
//
//   sparsa::Progress bar("eval", windows.size(), "win");
//   for (...) { ...; bar.advance(); }
//   bar.finish();
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace sparsa {

class Progress {
 public:
  Progress(std::string label, int64_t total, std::string unit = "it", bool enabled = true);
  void advance(int64_t n = 1, const std::string& extra = "");
  void finish();

 private:
  void draw(bool final_line);
  std::string label_, unit_, extra_;
  int64_t total_, done_ = 0;
  int last_decile_ = -1;
  bool enabled_, tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace sparsa
