"""A one-process run takes a free rendezvous port when the MASTER_PORT it inherited is taken."""

import os
import socket
import subprocess
import sys

from slm_cli.engine.launcher import free_port

CODE = "import os; from slm_cli.engine.distributed import setup_env; setup_env(); print(os.environ['MASTER_PORT'])"


def _port_after_setup(master_port: int) -> int:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_an_inherited_port_in_use_is_replaced_and_a_free_one_kept():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:  # the parent's own rendezvous store
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert _port_after_setup(taken) != taken  # before: kept, and DeepSpeed failed with EADDRINUSE
    free = free_port()
    assert _port_after_setup(free) == free
