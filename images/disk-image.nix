# nixpkgs' make-disk-image without the nixpkgs channel: every cloud format calls it with
# copyChannel left at true, which copies the whole nixpkgs source into the image as root's
# channel. The image modules here replace their format's build with this call.
{ config, lib, pkgs, modulesPath }:
args:
import (modulesPath + "/../lib/make-disk-image.nix") (
  {
    inherit config lib pkgs;
    inherit (config.image) baseName;
    inherit (config.virtualisation) diskSize;
    copyChannel = false;
  }
    // args
)
