import threading

import torch

from harness.launch.gpu_slots import claim_gpus, visible_ids


def test_jobs_claim_distinct_gpus_and_a_third_waits_for_a_free_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    (first,), (lock0,) = claim_gpus(tmp_path)
    (second,), (lock1,) = claim_gpus(tmp_path)
    assert {first, second} == {0, 1}
    got = []
    waiter = threading.Thread(target=lambda: got.append(claim_gpus(tmp_path, poll_s=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert got == []  # both GPUs taken
    lock1.release()
    waiter.join(5)
    assert got and got[0][0] == [second]
    got[0][1][0].release()
    lock0.release()


def test_a_job_of_two_gpus_waits_for_two_without_holding_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    (a,), (lock_a,) = claim_gpus(tmp_path)
    (b,), (lock_b,) = claim_gpus(tmp_path)
    got = []
    waiter = threading.Thread(target=lambda: got.append(claim_gpus(tmp_path, 2, poll_s=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert got == []  # one GPU free, two wanted
    (free,), (lock_free,) = claim_gpus(tmp_path, 1, poll_s=0.01)  # the waiting job does not keep it
    assert {a, b, free} == {0, 1, 2}
    lock_free.release()
    waiter.join(0.5)
    assert got == []
    lock_a.release()
    waiter.join(5)
    assert got and sorted(got[0][0]) == sorted([a, free])
    for lock in [*got[0][1], lock_b]:
        lock.release()


def test_visible_ids_map_through_the_devices_this_process_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_ids([1, 3]) == "1,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_ids([1, 3]) == "5,7"
