import threading

import torch

from harness.gpu_slots import claim_gpu


def test_jobs_claim_distinct_gpus_and_a_third_waits_for_a_free_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    first, lock0 = claim_gpu(tmp_path)
    second, lock1 = claim_gpu(tmp_path)
    assert {first, second} == {0, 1}
    got = []
    waiter = threading.Thread(target=lambda: got.append(claim_gpu(tmp_path, poll_s=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert got == []  # both GPUs taken
    lock1.release()
    waiter.join(5)
    assert got and got[0][0] == second
    got[0][1].release()
    lock0.release()
