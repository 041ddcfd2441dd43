// A small persistent pool: MLX's CPU stream runs each op on one worker thread, so
// a kernel that wants every core brings its own threads.
#pragma once

#include <functional>

namespace tqmetal::cpu {

// Threads used by the kernels: TQMETAL_NUM_THREADS if set, else every core.
int num_threads();

// Runs fn(task) for task in [0, n) on the pool (the caller works too) and returns
// when all are done. Exceptions from tasks are rethrown on the caller.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

} // namespace tqmetal::cpu
