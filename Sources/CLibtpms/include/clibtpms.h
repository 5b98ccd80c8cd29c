// libtpms for the in-process TPM backend (Backends/LibtpmsEngine.swift): the few TPMLIB_ calls it
// makes, and callbacks that route libtpms's NVRAM and locality questions to Swift.
//
// libtpms is one TPM per process, with global state: the caller makes sure one engine at a time
// uses it, from one thread at a time.
#pragma once
#include <stddef.h>
#include <stdint.h>

// What libtpms asks of its host, as plain C function pointers with a context (set by Swift).
// Every function returns a TPM_RESULT (0 = success, 0x800 = TPM_RETRY = "no such blob yet").
typedef struct clibtpms_host {
    void *context;
    // Loads blob `name` ("permall", "volatilestate", "savestate"): *data must be malloc'ed (libtpms
    // frees it), *length its size.
    uint32_t (*load)(void *context, const char *name, unsigned char **data, uint32_t *length);
    // Stores blob `name` durably before returning; `data` stays libtpms's.
    uint32_t (*store)(void *context, const char *name, const unsigned char *data, uint32_t length);
    // Removes blob `name`; `must_exist`: an absent blob is an error.
    uint32_t (*remove)(void *context, const char *name, int must_exist);
    // The locality of the command being processed (0-4).
    uint8_t locality;
} clibtpms_host;

// Registers `host` (kept by pointer until clibtpms_terminate) and libtpms's callbacks that use it.
// Call after clibtpms_choose_tpm2 and before clibtpms_main_init.
uint32_t clibtpms_register(clibtpms_host *host);
// TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_2).
uint32_t clibtpms_choose_tpm2(void);
// TPMLIB_SetBufferSize: returns the size in effect; *min and *max the bounds.
uint32_t clibtpms_set_buffer_size(uint32_t wanted, uint32_t *min, uint32_t *max);
// TPMLIB_MainInit: starts the TPM, loading its state through the host.
uint32_t clibtpms_main_init(void);
// TPMLIB_Process: runs `command`; *response is malloc'ed by libtpms (free it with clibtpms_free).
uint32_t clibtpms_process(unsigned char **response, uint32_t *response_length, uint32_t *response_capacity,
                          unsigned char *command, uint32_t command_length);
// TPMLIB_CancelCommand.
uint32_t clibtpms_cancel(void);
// TPMLIB_GetState(type) for TPMLIB_STATE_PERMANENT (1), VOLATILE (2), SAVE_STATE (4): a malloc'ed copy.
uint32_t clibtpms_get_state(uint32_t type, unsigned char **buffer, uint32_t *length);
// TPMLIB_SetState(type, ...): before clibtpms_main_init only.
uint32_t clibtpms_set_state(uint32_t type, const unsigned char *buffer, uint32_t length);
// TPMLIB_SetDebugFD: where libtpms writes its log lines (it writes failure-mode notices to stderr
// otherwise). `fd` stays the caller's.
void clibtpms_set_log_fd(int fd);
// Loads OpenSSL's configuration and seeds its random generator now, so that libtpms's first
// command, on the TPM thread inside its seccomp filter, opens no file (0 on success).
int clibtpms_prepare_crypto(void);
// TPMLIB_Terminate, and forgets the host.
void clibtpms_terminate(void);
// free(3), for buffers libtpms allocated.
void clibtpms_free(void *p);
