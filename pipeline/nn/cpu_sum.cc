// The sum of a float32 vector over the CPU devices of one process, as an XLA FFI handler
// (pipeline/nn/cpu_sum.py builds and registers it; docs/engines.md, "The devices meet by spinning").
//
// Each device's program calls it with its vector, its rank and the number of devices. The devices
// meet twice: once their vectors are all published, and once every device has written its share of
// the sum. Between the two, device r adds the elements of its r-th share of the vector over all the
// devices, in the order of the ranks, and writes that share into every device's output. A device that
// arrives first waits by spinning for up to `spin_us` microseconds, then sleeps on a futex: XLA's own
// all-reduce sleeps at once, and waking a sleeping core is what made it slow. While it spins it yields
// its core every few microseconds, so that a thread waiting for that core (another device of a
// process that shares the cores with this one) is not kept from it.
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxDevices = 256;
constexpr int64_t kMeetingPlaces = 64;  // one per run id modulo this: runs at once in a process rarely share one

struct alignas(64) MeetingPlace {
  std::atomic<bool> busy{false};        // guards `arrived`: held for a few instructions only
  int32_t arrived = 0;                  // devices at the meeting now open
  std::atomic<uint32_t> generation{0};  // the futex word: raised by the last device to arrive
  std::atomic<int32_t> sleepers{0};
  const float* in[kMaxDevices];
  float* out[kMaxDevices];
  int64_t run[kMaxDevices];
};

MeetingPlace places[kMeetingPlaces];

using Clock = std::chrono::steady_clock;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Held {  // `place.busy`, held while this lives
 public:
  explicit Held(MeetingPlace& place) : place_(place) {
    while (place_.busy.exchange(true, std::memory_order_acquire)) cpu_relax();
  }
  ~Held() { place_.busy.store(false, std::memory_order_release); }

 private:
  MeetingPlace& place_;
};

// Sleep while `word` holds `value`, at most until `deadline` (a futex: no busy core).
void sleep_while(std::atomic<uint32_t>& word, uint32_t value, Clock::time_point deadline) {
  const auto left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) return;
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
  timespec timeout{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, value, &timeout, nullptr, 0);
}

// Wait until all `devices` have arrived at `place`. False when `limit_s` passed first; the device
// then leaves the meeting, so that the place serves the next run as if it had never come.
bool meet(MeetingPlace& place, int64_t devices, int64_t spin_us, double limit_s) {
  uint32_t generation;
  bool last;
  {
    Held held(place);
    generation = place.generation.load(std::memory_order_relaxed);
    last = ++place.arrived == devices;
    if (last) {
      place.arrived = 0;
      place.generation.store(generation + 1, std::memory_order_seq_cst);
    }
  }
  if (last) {
    if (place.sleepers.load(std::memory_order_seq_cst) > 0)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&place.generation), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
              nullptr, 0);
    return true;
  }
  const auto start = Clock::now();
  const auto spin_end = start + std::chrono::microseconds(spin_us);
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(limit_s));
  for (int64_t i = 0;; ++i) {
    if (place.generation.load(std::memory_order_acquire) != generation) return true;
    if ((i & 63) == 63) {
      if (Clock::now() >= spin_end) break;
      sched_yield();
    }
    cpu_relax();
  }
  place.sleepers.fetch_add(1, std::memory_order_seq_cst);
  while (place.generation.load(std::memory_order_seq_cst) == generation && Clock::now() < deadline)
    sleep_while(place.generation, generation, deadline);
  place.sleepers.fetch_sub(1, std::memory_order_seq_cst);
  Held held(place);
  if (place.generation.load(std::memory_order_acquire) != generation) return true;
  --place.arrived;
  return false;
}

ffi::Error Failure(const std::string& what) { return ffi::Error(ffi::ErrorCode::kInternal, "cpu_sum: " + what); }

ffi::Error CpuSum(ffi::RunId run_id, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> rank_buffer,
                  ffi::ResultBuffer<ffi::F32> y, int64_t devices, int64_t spin_us, double limit_s) {
  const int64_t rank = rank_buffer.typed_data()[0];
  if (devices < 1 || devices > kMaxDevices || rank < 0 || rank >= devices)
    return Failure("rank " + std::to_string(rank) + " of " + std::to_string(devices) + " devices");
  MeetingPlace& place = places[static_cast<uint64_t>(run_id.run_id) % kMeetingPlaces];
  const int64_t n = x.element_count();
  place.in[rank] = x.typed_data();
  place.out[rank] = y->typed_data();
  place.run[rank] = run_id.run_id;
  auto late = [&] {
    char seconds[32];
    std::snprintf(seconds, sizeof seconds, "%g", limit_s);
    return Failure("device " + std::to_string(rank) + " of " + std::to_string(devices) + " waited " + seconds +
                   " s for the others (run " + std::to_string(run_id.run_id) + ")");
  };
  if (!meet(place, devices, spin_us, limit_s)) return late();
  for (int64_t d = 0; d < devices; ++d)
    if (place.run[d] != run_id.run_id)
      return Failure("runs " + std::to_string(place.run[d]) + " and " + std::to_string(run_id.run_id) + " met");
  // this device's share of the elements, added over the devices in the order of their ranks
  const int64_t begin = n * rank / devices, end = n * (rank + 1) / devices;
  float* const mine = place.out[rank];
  std::memcpy(mine + begin, place.in[0] + begin, (end - begin) * sizeof(float));
  for (int64_t d = 1; d < devices; ++d) {
    const float* __restrict xd = place.in[d];
    float* __restrict out = mine;
    for (int64_t i = begin; i < end; ++i) out[i] += xd[i];
  }
  for (int64_t d = 0; d < devices; ++d)
    if (d != rank) std::memcpy(place.out[d] + begin, mine + begin, (end - begin) * sizeof(float));
  // no device returns (and lets XLA reuse its vector) before every other has read it
  if (!meet(place, devices, spin_us, limit_s)) return late();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NndlCpuSum, CpuSum,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::RunId>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("devices")
                                  .Attr<int64_t>("spin_us")
                                  .Attr<double>("limit_s"));
