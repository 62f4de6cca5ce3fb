"""Command-line options that several inference entries share, spelled and checked one way.

The image limits take the names of the config keys of train.py and eval.py (`--max-image-pixels`,
`--max-aspect-ratio`), so the advice of an over-the-limit error ("raise --max-image-pixels") holds in every entry.
A value out of range is a usage error (exit status 2), like a misspelt flag.
"""
import argparse
import math

from engine.images import DEFAULT_LIMITS, ImageLimits


def worker_count(value):
    if value == "auto" or value.isdigit():
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got '{value}'")


def positive_int(value):
    if not value.lstrip("-").isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{value}'")
    return int(value)


def _number(value, low, inclusive, what):
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < low or (number == low and not inclusive):
        raise argparse.ArgumentTypeError(f"expected {what}, got '{value}'")
    return number


def positive_float(value):
    return _number(value, 0, False, "a number greater than 0")


def aspect_ratio(value):
    return _number(value, 1, True, "a ratio of at least 1 (long side / short side)")


def megapixels(value):
    """The old `--max-megapixels` of the server, turned into the pixels of `--max-image-pixels`."""
    return max(1, int(positive_float(value) * 1e6))


def port(value):
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got '{value}'")
    return int(value)


def add_image_limits(parser):
    """--max-image-pixels and --max-aspect-ratio, with the defaults of train.py and eval.py."""
    parser.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_LIMITS.max_pixels,
                        help="largest image accepted, in pixels once decoded (JPEGs at their reduced decoding scale)")
    parser.add_argument("--max-aspect-ratio", type=aspect_ratio, default=DEFAULT_LIMITS.max_aspect_ratio,
                        help="largest long side / short side accepted for an image")


def add_trusted_root(parser):
    """--trusted-root: the folder an index read from disk may point into (inference/index.py, ImageIndex.load)."""
    parser.add_argument("--trusted-root", default=".",
                        help="folder an index may name its images and checkpoint under (besides the index folder "
                             "itself); an index pointing elsewhere is refused")


def image_limits(args):
    return ImageLimits(args.max_image_pixels, args.max_aspect_ratio)
