# guest-agent built from this repository (pure Python; click is its only
# dependency). Used as the module's default package:
#   pkgs.python3Packages.callPackage ./package.nix { }
{
  lib,
  python,
  buildPythonApplication,
  setuptools,
  click,
  src ? ../..,
}:
buildPythonApplication {
  pname = "guest-agent";
  version = "0.1.0";
  inherit src;
  format = "pyproject";
  nativeBuildInputs = [ setuptools ];
  propagatedBuildInputs = [ click ];
  # The test suite boots VMs and needs root; the module's users run it in CI.
  doCheck = false;
  pythonImportsCheck = [ "guest_agent" ];
  # The interpreter the agent runs with, in the initrd too (its closure goes
  # into the initrd with the agent's): the module's nixDatabase option checks
  # at build time that it has sqlite3 (nixpkgs' python3 has; python3Minimal
  # has not).
  passthru = { inherit python; };
  meta = {
    description = "Boot-time mount agent for microVM guests";
    license = lib.licenses.mit;
    mainProgram = "guest-agent";
    platforms = lib.platforms.linux;
  };
}
