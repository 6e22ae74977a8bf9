"""Cases for the checkers of notebook 07 (moe_lab.course.checks.profiling): the right answer, and wrong answers
a learner plausibly writes, each with the words its message must contain. tests/course/test_checks.py runs
them: the right answer passes, each wrong one fails saying why, a NotImplementedError stub is
reported as "not implemented yet". The tests below add what those generic tests cannot see.

Run: .venv/bin/python -m pytest tests/course/test_checks.py tests/course/test_checks_profiling.py -q
"""
import pytest

from moe_lab.course import checks


def flops_right(T, d, f, k):
    return 3 * 2 * (T * k) * d * f


def active_right(T, E, k):
    return E * (1 - (1 - k / E) ** T)


def roof_right(intensity, peak, bw):
    return min(peak, intensity * bw)


CASES = {
    "check_moe_flops": (flops_right, [
        (lambda T, d, f, k: 2 * T * k * d * f, "one matmul"),
        (lambda T, d, f, k: 4 * T * k * d * f, "two matmuls"),
        (lambda T, d, f, k: 3 * T * k * d * f, "2\\*m\\*n\\*p"),
        (lambda T, d, f, k: 6 * T * d * f, "T\\*k routed rows"),
        (lambda T, d, f, k: 18 * T * k * d * f, "forward \\+ backward"),
        (lambda T, d, f, k: None, "should be a number"),
        # SwiGLU's elementwise work added to the matmuls (silu and the product, the routing weight):
        # the hint comes first, the numbers after it
        (lambda T, d, f, k: 6 * T * k * d * f + 5 * T * k * f, "^check_moe_flops: That adds SwiGLU's elementwise FLOPs"),
        (lambda T, d, f, k: 6 * T * k * d * f + 5 * T * k * f + 2 * T * k * d, "^check_moe_flops: That adds SwiGLU's"),
        (lambda T, d, f, k: 6 * T * k * d * f + 4 * T * k * f, "^check_moe_flops: That adds SwiGLU's"),
    ]),
    "check_expected_active_experts": (active_right, [
        (lambda T, E, k: min(E, T * k), "most experts"),
        (lambda T, E, k: E * (1 - (1 - 1 / E) ** (T * k)), "with replacement"),
        (lambda T, E, k: E * (1 - k / E) ** T, "idle"),
        (lambda T, E, k: E * (1 - (1 - k / E) ** (T - 1)), "= 0, expected 2"),
        (lambda T, E, k: E, "^check_expected_active_experts: That counts all E experts"),
    ]),
    "check_roofline": (roof_right, [
        (lambda i, p, b: i * b, "cap the result"),
        (lambda i, p, b: p, "intensity \\(FLOP/byte\\) \\* bandwidth"),
        (lambda i, p, b: max(p, i * b), "use min"),
        (lambda i, p, b: min(p, b / i), "not bandwidth / intensity"),
        (lambda i, p, b: min(p, 2 * i * b), "^check_roofline: That doubles the bandwidth"),
    ]),
}


def test_every_profiling_checker_has_cases_and_is_exported():
    names = {n for n in checks.__all__ if n in ("check_moe_flops", "check_expected_active_experts", "check_roofline")}
    assert names == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_stub_is_not_implemented_yet_and_names_the_checker(name):
    def stub(*args):
        raise NotImplementedError("Your turn: see the exercise above")

    with pytest.raises(checks.CheckFailed, match=f"{name}: not implemented yet"):
        getattr(checks, name)(stub)


def test_the_roofline_checker_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    checks.check_roofline(lambda i, p, b: np.minimum(p, np.float64(i) * b))


def test_a_failure_shows_the_learners_call_and_the_message_not_the_checkers_internals():
    """A notebook prints the traceback of a CheckFailed: it must lead the learner to the message, so at
    most one frame (the checker's entry point) comes from moe_lab.course.checks."""
    import traceback

    with pytest.raises(checks.CheckFailed) as info:
        checks.check_moe_flops(lambda T, d, f, k: 2 * T * k * d * f)
    inside = [fr for fr in traceback.extract_tb(info.value.__traceback__) if "moe_lab/checks" in fr.filename.replace("\\", "/")]
    assert len(inside) <= 1, [f"{fr.filename}:{fr.lineno} {fr.name}" for fr in inside]
    assert info.value.__cause__ is None and info.value.__suppress_context__
