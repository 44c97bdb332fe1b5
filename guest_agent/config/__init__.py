"""The agent's inputs: the kernel command line and the build-time JSON file, read as
hostile input (`inputs`: kind and size checked before a byte is read), parsed by
pure, total parsers (`parsers`, with `timespan` and `from_json` imported only when
needed) into specs, and merged keyed by mount point (`merge`); `switches` is the
table of boot switches every target reads.

May import: report, kernel, spec, records.
"""
