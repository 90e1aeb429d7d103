"""Tools around the artifacts: the C++ programs' build, a real Triton server and its environment."""
