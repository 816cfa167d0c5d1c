#!/usr/bin/perl
# Rewrites CUDA launches `kernel<T><<<grid, block, smem, stream>>>(args)` into calls the CPU
# emulator understands: `cudasim::launch(kernel<T>, "kernel<T>", grid, block, smem, stream)(args)`.
# Line numbers are kept (a #line directive names the original file).
use strict;
use warnings;
my ($in) = @ARGV;
local $/;
open(my $fh, '<', $in) or die "launch.pl: cannot read $in: $!\n";
my $src = <$fh>;
my $n = ($src =~ s/\b([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(/cudasim::launch($1, "$1", $2)(/gs);
print "#line 1 \"$in\"\n", $src;
