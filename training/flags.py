"""Command-line flags for the entry points (train.py, sample.py, bench.py, experiments.py): an
argparse parser whose errors are one line, and argparse types built on checks.py's checkers."""
import argparse
import os


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line ("train.py: argument --rank: must be ..."), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def checked(check, convert=int, **bounds):
    """An argparse `type`: convert the text, then check the value with a checker of checks.py."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = text  # not a number at all: the checker says what the flag accepts
        try:
            return check(value, "value", **bounds)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("value ")) from None
    return parse


def folder(text: str) -> str:
    if not text or os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}"
                                         + (", which is a file" if text else ""))
    return text


def writable_folder(text: str) -> str:
    """A folder to write into: it exists, or its nearest existing ancestor is a writable folder."""
    ancestor = os.path.abspath(folder(text))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK):
        why = "not writable" if os.path.isdir(ancestor) else "a file"
        raise argparse.ArgumentTypeError(f"cannot make or write {text!r}: {ancestor} is {why}")
    return text


def text_flag(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be at least one character")
    return text
