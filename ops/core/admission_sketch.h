// AdmissionSketch: a count-min sketch that counts occurrences of ids that do
// not have a row yet, so the frequency filter (min_count) uses fixed memory no
// matter how long the tail of one-off ids is.
//
// Four rows of 16-bit saturating counters, conservative update (only the
// smallest counters grow, which keeps overestimates low), and aging: after
// width/2 additions every counter is halved, so the sketch measures recent
// frequency and never silts up. An id is counted exactly (no false admission)
// unless other ids collide with it in all four rows; docs/admission.md gives
// the measured false-admission rate. Not thread-safe: the shard's lock guards it.
#ifndef MONOLITH_OPS_CORE_ADMISSION_SKETCH_H_
#define MONOLITH_OPS_CORE_ADMISSION_SKETCH_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace monolith {

class AdmissionSketch {
 public:
  static constexpr int kDepth = 4;
  static constexpr uint32_t kMaxCount = 0xFFFF;

  // `width` counters per row (a power of two); 0 disables the sketch.
  explicit AdmissionSketch(size_t width);

  // Counts one more occurrence and returns the new estimate of the id's count.
  uint32_t Add(uint64_t hash);
  uint32_t Estimate(uint64_t hash) const;

  size_t width() const { return width_; }
  size_t num_counters() const { return counters_.size(); }
  const uint16_t* counters() const { return counters_.data(); }
  uint16_t* mutable_counters() { return counters_.data(); }
  // Additions since the last halving (checkpointed with the counters). Halving
  // every width/2 additions keeps the mean counter load near 1/2, which holds
  // false admissions of one-off ids near 0.5% (docs/admission.md).
  int64_t additions() const { return additions_; }
  void set_additions(int64_t n) { additions_ = n; }
  size_t MemoryBytes() const { return counters_.capacity() * sizeof(uint16_t); }

 private:
  size_t Cell(uint64_t hash, int row) const;
  void Age();

  size_t width_;
  int64_t additions_ = 0;
  std::vector<uint16_t> counters_;  // kDepth rows of width_ counters
};

}  // namespace monolith

#endif  // MONOLITH_OPS_CORE_ADMISSION_SKETCH_H_
