"""x-nix-db: a Nix database on the writable volume, reconciled at every boot with
the read-only lower store. `state` runs a boot's reconcile (its steps in `steps`,
imported only when one runs), on the layers' fds (`layers`), through a private copy
of the database (`copy`) checked against Nix's schema (`schema`) and written as
`nix-store --load-db` writes it (`database`, `rows`, from `registration`);
`upper` keeps the upper layer's hygiene, `record` remembers the last reconcile,
`status` is `guest-agent status`'s view, `files` (the bottom) names the files.
See docs/nix-db.md.

May import: reset, kernel, spec, records.
"""
