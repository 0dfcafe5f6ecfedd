"""Running schedules on tensors: the executor, slot storage, collectives, lanes, kernels,
the merge, and a call's plan and passes."""
