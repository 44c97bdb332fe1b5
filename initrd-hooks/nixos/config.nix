# The agent's JSON config (docs/configuration.md) from the module's option
# values. Pure: builtins only, so it evaluates without nixpkgs
# (tests/vm/test_integrations.py evaluates it with nix-instantiate and feeds the
# result to `guest-agent mount-all --dry-run`).
{
  shares ? [ ],
  volumes ? [ ],
  writableStoreOverlay ? null,
  storeLower ? "/nix/.ro-store",
  overlayOptions ? [ ],
  resetPolicy ? "on-request",
  # x-nix-db: the agent keeps Nix's state (/nix/var/nix) on the RW volume and
  # reconciles its database with the lower store at every boot.
  nixDatabase ? false,
}:
let
  optionsOf = x: if (x.options or [ ]) == [ ] then { } else { options = x.options; };
  share = s: {
    inherit (s) tag mountPoint;
    proto = s.proto or "auto";
    readOnly = s.readOnly or false;
  } // optionsOf s;
  # exactly one of label / uuid / serial / device names the disk
  volumeSource = v:
    if (v.label or null) != null then { label = v.label; }
    else if (v.uuid or null) != null then { uuid = v.uuid; }
    else if (v.serial or null) != null then { serial = v.serial; }
    else if (v.device or null) != null then { what = v.device; }
    else throw "guest-agent: volume at ${v.mountPoint} needs a label, uuid, serial or device";
  volume = v:
    volumeSource v
    // {
      inherit (v) mountPoint;
      fsType = v.fsType or "auto";
      readOnly = v.readOnly or false;
    }
    // (
      let
        opts = (v.options or [ ]) ++ (if v.autoFormat or false then [ "x-makefs" ] else [ ]);
      in
      if opts == [ ] then { } else { options = opts; }
    );
  overlayOpts = overlayOptions ++ (if nixDatabase then [ "x-nix-db" ] else [ ]);
in
{
  shares = map share shares;
  volumes = map volume volumes;
  storeOverlay =
    if writableStoreOverlay == null then
      (
        if nixDatabase then
          throw "guest-agent: nixDatabase (x-nix-db) needs a store overlay: set writableStoreOverlay"
        else
          null
      )
    else
      {
        lower = storeLower;
        rw = writableStoreOverlay;
      }
      // (if overlayOpts == [ ] then { } else { options = overlayOpts; });
  resetOverlay = resetPolicy == "every-boot";
}
