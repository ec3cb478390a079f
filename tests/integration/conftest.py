import pytest

from swarmrt.config import config_from_dict

# Small and quick on 2 cores; short deadlines so hung peers are noticed fast.
FAST = {
    "run": {"id": "itest", "seed": 0},
    "model": {"factory": "swarmrt.models:tiny_llama", "kwargs": {"hidden_size": 32, "layers": 4, "heads": 4},
              "stages": 3},
    "data": {"seq_len": 32, "batch_size": 8, "microbatch_size": 4},
    "optimizer": {"lr": 3e-3, "samples_per_step": 8},
    "network": {"heartbeat_s": 0.5, "record_ttl_s": 2.0, "forward_timeout_s": 3.0, "backward_timeout_s": 3.0,
                "ban_s": 5.0, "no_peers_timeout_s": 60.0},
}


@pytest.fixture
def fast_config():
    return config_from_dict(FAST)
