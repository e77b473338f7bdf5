"""How much the gate convention changes the explanation: --gate-path up vs gate.

    python -m tools.gate_paths [--model gemma3-270m] [--prompt "..."]

Both conventions reconstruct the output exactly; the script prints each reconstruction error,
the relative Frobenius difference of the two full Jacobians, the cosine of their top left and
right singular vectors, and both stable ranks (float64).
"""

from __future__ import annotations

import argparse

import torch

from ggufjac.analysis import spectrum
from ggufjac.api import open_model
from ggufjac.linearize import Linearization


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--prompt", default="The bridge out of Marin is the")
    args = ap.parse_args()
    m = open_model(args.model, dtype="float64")
    tokens = m.tokenize(args.prompt)
    up, gate = (m.jacobian(tokens, Linearization(gate_path=g)) for g in ("up", "gate"))
    d = up.jacobian.shape[0]
    s_up, s_gate = (spectrum(r.jacobian.reshape(d, -1), r.output) for r in (up, gate))
    diff = torch.linalg.vector_norm(up.jacobian - gate.jacobian) / torch.linalg.vector_norm(
        up.jacobian)
    print(f"{args.model}, {args.prompt!r}, float64")
    print(f"reconstruction: up {up.reconstruction_rel_error():.1e}, "
          f"gate {gate.reconstruction_rel_error():.1e}")
    print(f"relative Frobenius difference ||J_up - J_gate|| / ||J_up|| = {float(diff):.2f}")
    print(f"cos of top left vectors {float(s_up.left[:, 0] @ s_gate.left[:, 0]):.2f}, "
          f"of top right vectors {float(s_up.right[0] @ s_gate.right[0]):.2f}")
    print(f"stable rank: up {s_up.stable_rank:.2f}, gate {s_gate.stable_rank:.2f}")


if __name__ == "__main__":
    main()
