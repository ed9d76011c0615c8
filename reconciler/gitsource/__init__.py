"""The config from a git remote (``run --source FILE``): fetch, trust, revisions, approval, previews.

:mod:`.git` runs git (the CLI) in a controlled environment; :mod:`.trust` verifies commit signatures
(SSH and OpenPGP) with git itself; :mod:`.clone` is the daemon's clone in the state directory (fetch,
one work tree per revision in use, the applied revision); :mod:`.approve` finds the commit that approves
destructive changes; :mod:`.sync` is one poll (fetch → examine → load → approve → verdict);
:mod:`.preview` exports another revision's config for ``plan --revision``.

Imports nothing here, like the other packages, so importing one module loads only what it needs.
"""
