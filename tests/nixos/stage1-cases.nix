# The guests tests/vm/test_nixos_stage1.py boots with nixpkgs' scripted
# stage 1 (tests/nixos/stage1.nix substitutes it from their evaluation).
# Every case is a microvm.nix guest on qemu: the devices the test attaches
# are read back from microvm.shares / microvm.volumes / storeOnDisk.
let
  roStore9p = {
    proto = "9p";
    tag = "ro-store";
    source = "/nix/store";
    mountPoint = "/nix/.ro-store";
  };
  homeVirtiofs = {
    proto = "virtiofs";
    tag = "home";
    source = "home";
    mountPoint = "/home";
  };
  rwVolume = label: {
    image = "rw-store.img";
    inherit label;
    mountPoint = "/nix/.rw-store";
    fsType = "ext4";
    size = 256;
  };
  # no label: microvm.nix mounts it by its drive letter
  scratchVolume = {
    image = "scratch.img";
    mountPoint = "/scratch";
    fsType = "ext4";
    size = 16;
  };
  guest =
    extra:
    {
      imports = [ extra ];
      networking.hostName = "stage1";
      microvm = {
        hypervisor = "qemu";
        shares = [
          roStore9p
          homeVirtiofs
        ];
        volumes = [
          (rwVolume "nix-store")
          scratchVolume
        ];
        writableStoreOverlay = "/nix/.rw-store";
      };
      boot.initrd.guest-agent = {
        enable = true;
        fromMicrovm = true;
      };
    };
in
{
  # 9p ro-store under the overlay, a virtiofs share, a labelled and an
  # unlabelled volume; x-nix-db (regInfo= on the command line)
  share.module = guest { boot.initrd.guest-agent.nixDatabase = true; };
  # the store as an erofs disk (storeOnDisk), the overlay on it
  disk-erofs.module = guest (
    { lib, ... }:
    {
      microvm.shares = lib.mkForce [ homeVirtiofs ];
      # the store disk is labelled nix-store (erofs)
      microvm.volumes = lib.mkForce [
        (rwVolume "rw-store")
        scratchVolume
      ];
    }
  );
  # a required mount fails: the failure policy (onFailure's default, continue,
  # overridden by guest-agent.onfail=shell on the command line) drops to
  # stage 1's `fail`
  fail-shell.module = guest { };
  # a volume the agent formats (x-makefs) when it is blank
  auto-format.module = guest (
    { lib, ... }:
    {
      microvm.volumes = lib.mkForce [
        (rwVolume "nix-store")
        (
          scratchVolume
          // {
            image = "data.img";
            mountPoint = "/data";
          }
        )
      ];
      boot.initrd.guest-agent.volumes = [
        {
          label = "nix-store";
          mountPoint = "/nix/.rw-store";
          fsType = "ext4";
        }
        {
          device = "/dev/vdb";
          mountPoint = "/data";
          fsType = "ext4";
          autoFormat = true;
        }
      ];
    }
  );
}
