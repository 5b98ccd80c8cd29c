#include "clibtpms.h"

#include <libtpms/tpm_error.h>
#include <libtpms/tpm_library.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdlib.h>

static clibtpms_host *current_host;

static TPM_RESULT nvram_init(void) { return TPM_SUCCESS; }

static TPM_RESULT nvram_loaddata(unsigned char **data, uint32_t *length, uint32_t tpm_number, const char *name) {
    (void)tpm_number;
    if (!current_host || !current_host->load) return TPM_FAIL;
    *data = NULL;
    *length = 0;
    return current_host->load(current_host->context, name, data, length);
}

static TPM_RESULT nvram_storedata(const unsigned char *data, uint32_t length, uint32_t tpm_number, const char *name) {
    (void)tpm_number;
    if (!current_host || !current_host->store) return TPM_FAIL;
    return current_host->store(current_host->context, name, data, length);
}

static TPM_RESULT nvram_deletename(uint32_t tpm_number, const char *name, TPM_BOOL must_exist) {
    (void)tpm_number;
    if (!current_host || !current_host->remove) return TPM_FAIL;
    return current_host->remove(current_host->context, name, must_exist ? 1 : 0);
}

static TPM_RESULT io_init(void) { return TPM_SUCCESS; }

static TPM_RESULT io_getlocality(TPM_MODIFIER_INDICATOR *locality, uint32_t tpm_number) {
    (void)tpm_number;
    *locality = current_host ? current_host->locality : 0;
    return TPM_SUCCESS;
}

static TPM_RESULT io_getphysicalpresence(TPM_BOOL *present, uint32_t tpm_number) {
    (void)tpm_number;
    *present = 0;
    return TPM_SUCCESS;
}

uint32_t clibtpms_register(clibtpms_host *host) {
    static struct libtpms_callbacks callbacks = {
        .sizeOfStruct = sizeof(struct libtpms_callbacks),
        .tpm_nvram_init = nvram_init,
        .tpm_nvram_loaddata = nvram_loaddata,
        .tpm_nvram_storedata = nvram_storedata,
        .tpm_nvram_deletename = nvram_deletename,
        .tpm_io_init = io_init,
        .tpm_io_getlocality = io_getlocality,
        .tpm_io_getphysicalpresence = io_getphysicalpresence,
    };
    current_host = host;
    return TPMLIB_RegisterCallbacks(&callbacks);
}

uint32_t clibtpms_choose_tpm2(void) { return TPMLIB_ChooseTPMVersion(TPMLIB_TPM_VERSION_2); }

uint32_t clibtpms_set_buffer_size(uint32_t wanted, uint32_t *min, uint32_t *max) {
    return TPMLIB_SetBufferSize(wanted, min, max);
}

uint32_t clibtpms_main_init(void) { return TPMLIB_MainInit(); }

uint32_t clibtpms_process(unsigned char **response, uint32_t *response_length, uint32_t *response_capacity,
                          unsigned char *command, uint32_t command_length) {
    return TPMLIB_Process(response, response_length, response_capacity, command, command_length);
}

uint32_t clibtpms_cancel(void) { return TPMLIB_CancelCommand(); }

uint32_t clibtpms_get_state(uint32_t type, unsigned char **buffer, uint32_t *length) {
    return TPMLIB_GetState((enum TPMLIB_StateType)type, buffer, length);
}

uint32_t clibtpms_set_state(uint32_t type, const unsigned char *buffer, uint32_t length) {
    return TPMLIB_SetState((enum TPMLIB_StateType)type, buffer, length);
}

void clibtpms_set_log_fd(int fd) { TPMLIB_SetDebugFD(fd); }

int clibtpms_prepare_crypto(void) {
    // What OpenSSL would otherwise do on libtpms's first use of it, on whichever thread that is:
    // read its configuration file (an open(2)) and seed its random generator.
    if (OPENSSL_init_crypto(OPENSSL_INIT_LOAD_CONFIG, NULL) != 1) return -1;
    unsigned char byte;
    return RAND_bytes(&byte, 1) == 1 ? 0 : -1;
}

void clibtpms_terminate(void) {
    TPMLIB_Terminate();
    current_host = NULL;
}

void clibtpms_free(void *p) { free(p); }
