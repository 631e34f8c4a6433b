"""A spike rollback loads the checkpoint rank 0 chose, on every rank (as resume does)."""


def test_rollback_loads_rank_0s_choice(tiny_cfg):
    from ernie5.train.trainer import Trainer

    tr = Trainer(tiny_cfg("train.max_steps=4", "checkpoint.interval=2", "checkpoint.keep_last=3"), quiet=True)
    tr.train()
    assert tr.step == 4
    seen = []

    def rank0_says_step_2(value):  # this rank sees step 4 as newest; rank 0 (say, mid-rewrite of 4) chose 2
        seen.append(value)
        return 2

    tr.topo.broadcast_int = rank0_says_step_2
    tr.rollback()
    assert seen == [4] and tr.step == 2
