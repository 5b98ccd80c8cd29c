// The libtpms embedding API used by the in-process TPM backend (Backends/LibtpmsEngine.swift).
#pragma once
#include <stdint.h>
