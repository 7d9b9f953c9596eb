import pytest

from moesim import units
from moesim.errors import InputError


@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("80 GiB", "bytes", 80 * 2**30),
        ("80GB", "bytes", 80e9),
        ("50 MiB", "bytes", 50 * 2**20),
        ("3.35 TB/s", "bandwidth", 3.35e12),
        ("400 Gb/s", "bandwidth", 50e9),
        ("400 Gbps", "bandwidth", 50e9),
        ("989.4 TFLOPS", "flops", 989.4e12),
        ("1978.9 TOPS", "flops", 1978.9e12),
        ("25 us", "time", 25e-6),
        ("1.5 ms", "time", 1.5e-3),
        ("700 W", "power", 700.0),
        ("1.98 GHz", "frequency", 1.98e9),
        (42, "bytes", 42.0),
    ],
)
def test_parse(text, kind, expected):
    assert units.parse(text, kind) == pytest.approx(expected)


@pytest.mark.parametrize("text, kind", [("12 XB", "bytes"), ("fast", "bandwidth"), ("3 parsecs", "time"), ("10 GB", "flops")])
def test_parse_rejects_with_an_example(text, kind):
    with pytest.raises(InputError) as info:
        units.parse(text, kind)
    assert repr(text) in str(info.value)


def test_format_round_trips_to_readable_units():
    assert units.fmt_bytes(80 * 2**30) == "80 GiB"
    assert units.fmt_bandwidth(3.35e12) == "3.35 TB/s"
    assert units.fmt_time(25e-6) == "25 us"
    assert units.fmt_flops(989.4e12) == "989 TFLOP/s"
    assert units.fmt_count(46.7e9) == "46.7B"
