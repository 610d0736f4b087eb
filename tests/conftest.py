import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pytest

import diffjax

diffjax.xla_cpu.tune()  # the test suite is an entry point: XLA:CPU flags and malloc options before JAX starts


def all_schedules():
    return [
        diffjax.VPLinear(),
        diffjax.VPCosine(),
        diffjax.SubVP(),
        diffjax.VE(),
        diffjax.RectifiedFlow(),
        diffjax.DiscreteDDPM.linear(),
        diffjax.DiscreteDDPM.cosine(),
    ]


SCHEDULE_IDS = ["vp_linear", "vp_cosine", "subvp", "ve", "rf", "ddpm_linear", "ddpm_cosine"]


@pytest.fixture(params=list(zip(SCHEDULE_IDS, all_schedules())), ids=SCHEDULE_IDS)
def schedule(request):
    return request.param[1]
