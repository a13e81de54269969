#!/usr/bin/env python3
"""Links monolith_tf's ops into a TensorFlow Serving source checkout.

Makes the two edits that docs/bazel.md part (b) describes, and checks them:

1. WORKSPACE: appends serving/WORKSPACE.append (declares @monolith_tf as a
   local_repository and @monolith_tf_config, which points our BUILD's
   TensorFlow labels at @org_tensorflow), with the path filled in.
2. tensorflow_serving/model_servers/BUILD: appends "@monolith_tf//:ops_lib" to
   the SUPPORTED_TENSORFLOW_OPS expression, which server_lib depends on.

Both edits are idempotent: running the script twice changes nothing the second
time. It refuses, with a non-zero exit and a reason, when the checkout does not
look the way the edits assume: no SUPPORTED_TENSORFLOW_OPS, an expression it
cannot parse, no org_tensorflow in WORKSPACE, a Bzlmod-only checkout, or a
repository name that is already taken. In those cases make the edit by hand
(serving/README.md shows both) rather than trusting a half-applied patch.

    python3 add_monolith_ops.py --serving-root /serving-src --monolith-path /monolith_tf
    python3 add_monolith_ops.py --serving-root /serving-src --check   # verify only

Run by serving/Dockerfile; standard library only, Python 3.8+.
"""

import argparse
import ast
import difflib
import os
import re
import sys

LABEL = "@monolith_tf//:ops_lib"
VARIABLE = "SUPPORTED_TENSORFLOW_OPS"
BUILD_PATH = os.path.join("tensorflow_serving", "model_servers", "BUILD")
SNIPPET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "WORKSPACE.append")
PATH_PLACEHOLDER = "@MONOLITH_TF_PATH@"
# First line of the appended WORKSPACE block; how a rerun recognises it.
WORKSPACE_MARKER = "# ===== monolith_tf custom ops (Monolith>HashTable*) ====="
BUILD_COMMENT = "# monolith_tf: Monolith>HashTable* ops (serving/add_monolith_ops.py)"


class PatchError(Exception):
    """The checkout is not in the shape the edit assumes."""


# ---------------------------------------------------------------------------
# model_servers/BUILD
# ---------------------------------------------------------------------------

def _expression_end(text, start):
    """(end, code_end) of the Starlark expression that begins at `start`.

    The expression ends at the first newline outside brackets that is not
    escaped by a backslash (`end`); `code_end` is just past its last character
    of code, i.e. before any trailing comment. Strings (single, double,
    triple-quoted) and comments are skipped, so brackets or '#' inside them do
    not count.
    """
    depth = 0
    i, n = start, len(text)
    seen_token = False
    code_end = start
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in "\"'":
            quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else c
            i += len(quote)
            while True:
                if i >= n:
                    raise PatchError("unterminated string in %s" % VARIABLE)
                if text[i] == "\\":
                    i += 2
                    continue
                if text.startswith(quote, i):
                    i += len(quote)
                    code_end = i
                    break
                if len(quote) == 1 and text[i] == "\n":
                    raise PatchError("newline inside a string in %s" % VARIABLE)
                i += 1
            seen_token = True
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                raise PatchError("unbalanced brackets in %s" % VARIABLE)
        elif c == "\\" and text[i + 1:i + 2] == "\n":
            i += 2
            continue
        elif c == "\n" and depth == 0 and seen_token:
            return i, code_end
        if not c.isspace():
            seen_token = True
            code_end = i + 1
        i += 1
    if depth != 0:
        raise PatchError("unbalanced brackets in %s" % VARIABLE)
    return n, code_end


def _find_assignment(text):
    """(start, end, code_end) of the right-hand side of the one top-level
    assignment (see _expression_end)."""
    matches = list(re.finditer(r"^%s[ \t]*=(?!=)[ \t]*" % VARIABLE, text, re.MULTILINE))
    if not matches:
        raise PatchError(
            "no top-level `%s = ...` in %s. TF Serving may have renamed or moved "
            "the list of op libraries linked into the server; add %s to it by hand."
            % (VARIABLE, BUILD_PATH, LABEL))
    if len(matches) > 1:
        raise PatchError("%s is assigned %d times in %s; edit it by hand."
                         % (VARIABLE, len(matches), BUILD_PATH))
    start = matches[0].end()
    end, code_end = _expression_end(text, start)
    return start, end, code_end


def _check_expression(expr):
    """The right-hand side must parse as an expression (Starlark's list/call/+
    syntax is Python's), so the edit cannot leave a broken BUILD file."""
    try:
        ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise PatchError("cannot parse the %s expression (%s):\n%s" % (VARIABLE, e, expr))


def _labels_in(expr):
    """String literals of the expression (comments ignored)."""
    tree = ast.parse(expr.strip(), mode="eval")
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def patch_build(text):
    """Returns (new_text, changed). Raises PatchError if the layout is unexpected."""
    start, end, code_end = _find_assignment(text)
    expr = text[start:end]
    _check_expression(expr)
    uses = len(re.findall(r"\b%s\b" % VARIABLE, text)) - 1
    if uses < 1:
        raise PatchError("%s is defined but never used in %s, so adding to it would "
                         "not link anything; find where the server's op libraries "
                         "are listed now." % (VARIABLE, BUILD_PATH))
    if LABEL in _labels_in(expr):
        return text, False
    # Inserted after the last character of code, so a trailing comment on the
    # expression's last line stays a comment after it.
    addition = " + [\n    %s\n    \"%s\",\n]" % (BUILD_COMMENT, LABEL)
    new_text = text[:code_end] + addition + text[code_end:]
    new_start, new_end, _ = _find_assignment(new_text)
    _check_expression(new_text[new_start:new_end])
    return new_text, True


def verify_build(text):
    start, end, _ = _find_assignment(text)
    expr = text[start:end]
    _check_expression(expr)
    count = _labels_in(expr).count(LABEL)
    if count != 1:
        raise PatchError("%s lists %s %d times (expected once)" % (VARIABLE, LABEL, count))


# ---------------------------------------------------------------------------
# WORKSPACE
# ---------------------------------------------------------------------------

def _workspace_file(root):
    for name in ("WORKSPACE", "WORKSPACE.bazel"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _declares(text, name):
    return re.search(r"\bname\s*=\s*[\"']%s[\"']" % re.escape(name), text) is not None


def snippet_for(monolith_path):
    with open(SNIPPET_PATH) as f:
        snippet = f.read()
    if PATH_PLACEHOLDER not in snippet:
        raise PatchError("%s has no %s placeholder" % (SNIPPET_PATH, PATH_PLACEHOLDER))
    if not snippet.startswith(WORKSPACE_MARKER):
        raise PatchError("%s must start with the marker line %r" % (SNIPPET_PATH, WORKSPACE_MARKER))
    return snippet.replace(PATH_PLACEHOLDER, monolith_path)


def patch_workspace(text, monolith_path):
    """Returns (new_text, changed)."""
    if not _declares(text, "org_tensorflow"):
        raise PatchError(
            "WORKSPACE does not declare org_tensorflow. If this TF Serving version "
            "declares its dependencies in MODULE.bazel (Bzlmod), use the Bzlmod "
            "variant in serving/README.md instead of this script.")
    if WORKSPACE_MARKER in text:
        m = re.search(r"name\s*=\s*\"monolith_tf\",\s*path\s*=\s*\"([^\"]*)\"",
                      text[text.index(WORKSPACE_MARKER):])
        if m and m.group(1) != monolith_path:
            raise PatchError("WORKSPACE already declares @monolith_tf at %r, not %r"
                             % (m.group(1), monolith_path))
        return text, False
    for name in ("monolith_tf", "monolith_tf_config"):
        if _declares(text, name):
            raise PatchError("WORKSPACE already declares a repository named %r "
                             "(not by this script); remove it or edit by hand." % name)
    snippet = snippet_for(monolith_path)
    sep = "" if text.endswith("\n") else "\n"
    return text + sep + "\n" + snippet, True


def verify_workspace(text):
    if text.count(WORKSPACE_MARKER) != 1:
        raise PatchError("the monolith_tf block appears %d times in WORKSPACE (expected once)"
                         % text.count(WORKSPACE_MARKER))
    block = text[text.index(WORKSPACE_MARKER):]
    for needed in ('name = "monolith_tf"', '"@local_config_tf": "@monolith_tf_config"',
                   'name = "monolith_tf_config"', 'tensorflow_source_repo = "@org_tensorflow"'):
        if needed not in block:
            raise PatchError("the monolith_tf block in WORKSPACE lacks %r" % needed)
    org_tf = re.search(r"\bname\s*=\s*[\"']org_tensorflow[\"']", text)
    if org_tf is None or text.index(WORKSPACE_MARKER) < org_tf.start():
        raise PatchError("the monolith_tf block must come after org_tensorflow is declared")


# ---------------------------------------------------------------------------

def _read(path):
    with open(path) as f:
        return f.read()


def _write(path, text):
    tmp = path + ".monolith_tf.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _diff(path, old, new):
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        fromfile="a/" + path, tofile="b/" + path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving-root", default=".",
                        help="root of the tensorflow/serving checkout (default: .)")
    parser.add_argument("--monolith-path",
                        help="path of the monolith_tf checkout as Bazel should see it: absolute, "
                             "or relative to the serving root (required unless --check)")
    parser.add_argument("--check", action="store_true",
                        help="only verify that both edits are present; change nothing")
    args = parser.parse_args(argv)

    root = os.path.abspath(args.serving_root)
    build_file = os.path.join(root, BUILD_PATH)
    workspace_file = _workspace_file(root)
    try:
        if not os.path.isfile(build_file):
            raise PatchError("%s not found: is %s a tensorflow/serving checkout?" % (build_file, root))
        if workspace_file is None:
            raise PatchError(
                "no WORKSPACE in %s. %s" % (root, "It has a MODULE.bazel: use the Bzlmod variant "
                                            "in serving/README.md." if os.path.isfile(
                                                os.path.join(root, "MODULE.bazel")) else ""))
        if not args.check:
            if not args.monolith_path:
                parser.error("--monolith-path is required unless --check")
            local = args.monolith_path if os.path.isabs(args.monolith_path) else os.path.join(
                root, args.monolith_path)
            for needed in ("WORKSPACE", "BUILD", "build_defs.bzl", "third_party/tf/tf_configure.bzl"):
                if not os.path.isfile(os.path.join(local, needed)):
                    raise PatchError("%s has no %s: --monolith-path must be the monolith_tf "
                                     "checkout" % (local, needed))

            old = _read(workspace_file)
            new, changed = patch_workspace(old, args.monolith_path)
            if changed:
                _write(workspace_file, new)
                sys.stdout.write(_diff(os.path.basename(workspace_file), old, new))
            else:
                print("WORKSPACE: @monolith_tf already declared")

            old = _read(build_file)
            new, changed = patch_build(old)
            if changed:
                _write(build_file, new)
                sys.stdout.write(_diff(BUILD_PATH, old, new))
            else:
                print("%s: %s already in %s" % (BUILD_PATH, LABEL, VARIABLE))

        verify_workspace(_read(workspace_file))
        verify_build(_read(build_file))
    except PatchError as e:
        print("add_monolith_ops.py: error: %s" % e, file=sys.stderr)
        return 1
    print("OK: %s is in %s and @monolith_tf is declared in %s"
          % (LABEL, VARIABLE, os.path.basename(workspace_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
