"""Run by tests/test_eval_compare.py under `torchrun --nproc_per_node 2`: the eval command's process group
and `on_main` on real ranks. Prints one line per check and rank, for the test to read."""

from __future__ import annotations

import torch
import torch.distributed as dist

from eval.harness import on_main
from pipeline.eval_command import make_eval_accelerator


def main() -> None:
    acc = make_eval_accelerator(timeout_minutes=7)  # structlora eval's Accelerator
    rank = acc.process_index
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    print(f"rank {rank}: world {acc.num_processes} timeout {backend.options._timeout}", flush=True)
    print(f"rank {rank}: result {on_main(acc, lambda: 40 + 2, 'scoring')}", flush=True)
    try:
        on_main(acc, lambda: 1 / 0, "scoring")
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank got
        print(f"rank {rank}: raised {type(err).__name__}: {err}", flush=True)
    else:
        print(f"rank {rank}: did not raise", flush=True)
    acc.wait_for_everyone()  # every rank reaches this: nobody is left waiting for rank 0
    dist.destroy_process_group()  # a clean exit: gloo's threads may abort a process that leaves them running


if __name__ == "__main__":
    main()
