# The one task scheduler of the CPU kernels: tasks pulled from a shared atomic counter.
from std.atomic import Atomic
from std.sys import num_physical_cores
from max.algorithm import parallelize


def num_workers(n: Int) -> Int:
    """Workers run_dynamic uses for n tasks."""
    return max(1, min(num_physical_cores(), n))


def run_dynamic[F: def(Int, Int) -> None](func: F, n: Int):
    """Run func(task, worker) for task in 0 ..< n on num_workers(n) workers, each pulling
    the next task from a shared atomic counter (load balance across unequal tasks, and
    robust to a core being taken by another process; `parallelize` splits statically)."""
    if n <= 0:
        return
    var workers = num_workers(n)
    if workers == 1:
        for i in range(n):
            func(i, 0)
        return
    var counter = Atomic[Int64](0)

    def worker(w: Int) {ref counter, ref func, var n}:
        var i = Int(counter.fetch_add(1))
        while i < n:
            func(i, w)
            i = Int(counter.fetch_add(1))

    parallelize(worker, workers, workers)
