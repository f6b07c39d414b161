"""The course needs no network: load every model and dataset with sockets refused."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network blocked by test_offline")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import peftlab
    model, tok = peftlab.load_model("minilm")
    model(**tok(["works offline"], return_tensors="pt"))
    lm, lm_tok = peftlab.load_model("smollm2", task="causal-lm")
    lm.generate(**lm_tok(["Hello"], return_tensors="pt"), max_new_tokens=2, do_sample=False)
    assert len(peftlab.load_sentiment("rotten_tomatoes")["train"]) > 6000
    assert len(peftlab.load_e2e()["test"]) > 4000
    print("OFFLINE-OK")
""")


@pytest.mark.slow
def test_models_and_data_load_with_network_blocked():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OFFLINE-OK" in proc.stdout
