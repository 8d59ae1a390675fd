"""What to tell a user whose model torch.export cannot capture because of Python control flow.

Used by hwopt.aot when capture fails: ``if tensor:`` / ``while tensor:`` / ``range(int(t))`` in a
forward needs a data-dependent guard, which export rejects (GuardOnDataDependentSymNode, "Could not
guard on data-dependent expression", "data-dependent"). The fix is to write the control flow with
torch.cond / torch.while_loop (hwopt's split pass compiles every branch and runs the choice on the
host), or to use torch.compile, where Dynamo breaks the graph at the ``if`` and each side is
compiled on its own.
"""
from __future__ import annotations

_MARKERS = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent",
            "DataDependentOutputException", "unbacked")


def capture_hint(error: BaseException) -> str:
    """A hint to append to the capture error, or '' when the error is not about control flow."""
    text = f"{type(error).__name__}: {error}"
    if not any(m in text for m in _MARKERS):
        return ""
    return ("\nhwopt: this looks like Python control flow on a tensor value (if/while on a "
            "tensor, or a loop over int(tensor)); torch.export cannot capture it. Write it as "
            "torch.cond(pred, true_fn, false_fn, (x,)) or torch._higher_order_ops.while_loop("
            "cond_fn, body_fn, carried): hwopt compiles every branch and picks one on the host. "
            "Or use torch.compile(model, backend='hwopt'), which compiles each side of the "
            "branch separately.")
