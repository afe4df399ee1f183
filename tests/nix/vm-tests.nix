{ pkgs, modules }:
{ }
