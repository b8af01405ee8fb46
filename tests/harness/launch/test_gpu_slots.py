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


def test_two_jobs_per_gpu_spread_over_the_gpus_then_share_them_and_a_fifth_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    claims = [claim_gpus(tmp_path, jobs_per_gpu=2) for _ in range(4)]
    assert [gpus for gpus, _ in claims] == [[0], [1], [0], [1]]  # every GPU gets a job before one gets two
    got = []
    waiter = threading.Thread(target=lambda: got.append(claim_gpus(tmp_path, poll_s=0.05, jobs_per_gpu=2)))
    waiter.start()
    waiter.join(0.5)
    assert got == []  # four slots, four jobs
    claims[3][1][0].release()  # a job on GPU 1 ends
    waiter.join(5)
    assert got and got[0][0] == [1]
    for _, locks in [*claims[:3], got[0]]:
        for lock in locks:
            lock.release()


def test_a_two_gpu_job_takes_slots_on_two_different_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus, locks = claim_gpus(tmp_path, 2, jobs_per_gpu=2)
    other, other_locks = claim_gpus(tmp_path, 2, jobs_per_gpu=2)
    assert sorted(gpus) == sorted(other) == [0, 1]
    for lock in [*locks, *other_locks]:
        lock.release()


def test_the_gpus_launcher_runs_gpus_times_jobs_per_gpu_jobs(monkeypatch):
    from omegaconf import OmegaConf

    import harness.config
    from harness.config import CONF_DIR, gpu_jobs
    monkeypatch.setattr(harness.config, "cuda_count", lambda: 4)
    assert gpu_jobs(1, 1) == 4 and gpu_jobs(1, 2) == 8 and gpu_jobs(2, 3) == 6
    monkeypatch.setattr(harness.config, "cuda_count", lambda: 0)
    assert gpu_jobs(1, 4) == 4  # no GPU: the jobs share the CPU's one slot of work
    monkeypatch.setattr(harness.config, "cuda_count", lambda: 2)
    launcher = OmegaConf.load(CONF_DIR / "hydra" / "launcher" / "gpus.yaml")
    cfg = OmegaConf.create({"trainer": {"ranks_per_job": 1, "jobs_per_gpu": 3}, "launcher": launcher})
    assert cfg.launcher.n_jobs == 6
