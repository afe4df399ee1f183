#!/usr/bin/env python3
"""Hands AWS CLI calls to the real AWS CLI, in one process, without credentials.

Reads one JSON list of arguments per line on stdin (a call of `aws` without the `aws`). The AWS
CLI checks every parameter (names, types, shorthand syntax, lengths) before it looks for
credentials, so a call that ends in "Unable to locate credentials" is well formed. Prints each
call that ends otherwise, with the CLI's message, and exits 1 if there was one. Run it with the
Python of the environment the AWS CLI is installed in (tests/examples/install-deps).
"""
import contextlib
import io
import json
import os
import sys

os.environ.update({
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_DEFAULT_REGION": "us-east-1",
})
for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
    os.environ.pop(name, None)

from awscli.clidriver import create_clidriver  # noqa: E402  (after the environment is set)


def main():
    bad = 0
    for line in sys.stdin:
        args = json.loads(line)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                create_clidriver().main(args)
            except SystemExit:
                pass
        if "Unable to locate credentials" not in err.getvalue():
            bad += 1
            print(f"aws {' '.join(args)}\n  {err.getvalue().strip()}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
