#!/usr/bin/python3
"""Pastes `antkv-eval methods --format markdown` between the methods-support markers of docs/METHODS.md.

usage: python3 scripts/methods_table.py [path/to/antkv-eval]   (default build/apps/antkv-eval)
tests/test_method_support.cpp fails while the docs' table differs from the one antkv-eval prints."""
import os
import subprocess
import sys

BEGIN, END = "<!-- BEGIN methods-support", "<!-- END methods-support -->"


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "build", "apps", "antkv-eval")
    table = subprocess.run([exe, "methods", "--format", "markdown"], check=True, capture_output=True,
                           text=True).stdout
    doc_path = os.path.join(root, "docs", "METHODS.md")
    with open(doc_path, encoding="utf-8") as f:
        doc = f.read()
    b, e = doc.find(BEGIN), doc.find(END)
    if b < 0 or e < 0:
        sys.exit(f"{doc_path}: the markers {BEGIN} ... {END} are missing")
    body = doc.index("\n", b) + 1
    tmp = doc_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(doc[:body] + table + doc[e:])
    os.replace(tmp, doc_path)
    print(f"{doc_path}: table of {table.count(chr(10)) - 2} methods written")


if __name__ == "__main__":
    main()
