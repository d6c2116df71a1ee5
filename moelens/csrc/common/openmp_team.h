// Pinning a service's OpenMP team to CPUs (moelens/compute_loop.py decides where).
//
// Why: on a host where the expert and attention services take turns on the same cores, a
// team's threads otherwise wander, and a worker woken on a halted (virtual) CPU costs up to
// milliseconds; pinned, each turn's hand-offs stay on one CPU and the workers on theirs.
#pragma once

#include <omp.h>
#include <pthread.h>
#include <sched.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace moelens {

// Thread t of the calling thread's team (t = 0 is the caller) goes to cpus[t]; the team has
// cpus.size() threads, as every later parallel region of that size reuses them. Returns the CPU
// each thread was pinned to, -1 where the system refused.
inline std::vector<int64_t> pin_openmp_team(const std::vector<int64_t>& cpus) {
  if (cpus.empty()) throw std::invalid_argument("pin_openmp_team: no CPUs given");
  for (int64_t cpu : cpus) {
    if (cpu < 0 || cpu >= CPU_SETSIZE) throw std::invalid_argument("pin_openmp_team: bad CPU");
  }
  const int size = static_cast<int>(cpus.size());
  std::vector<int64_t> pinned(cpus.size(), -1);
#pragma omp parallel num_threads(size)
  {
    const int t = omp_get_thread_num();
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(static_cast<int>(cpus[t]), &one);
    if (pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0) pinned[t] = cpus[t];
  }
  return pinned;
}

}  // namespace moelens
