package hsm

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long ck_ulong;
typedef ck_ulong (*ck_encrypt_fn)(ck_ulong session, unsigned char *data, ck_ulong len, unsigned char *out, ck_ulong *out_len);
typedef ck_ulong (*ck_get_function_list_fn)(void **list);

// The head of CK_FUNCTION_LIST up to C_Encrypt, with the platform's default alignment as on every Unix: a
// CK_VERSION, then the functions in the standard's order, C_Initialize first; C_Encrypt is the 31st.
struct ck_function_list_head {
	unsigned char major, minor;
	void *before_encrypt[30];
	ck_encrypt_fn encrypt;
};

// cmk_open loads the library once more (the loader shares the copy miekg/pkcs11 holds) and finds its C_Encrypt
// through C_GetFunctionList, as every PKCS#11 application must. It stays loaded for the life of the process,
// as the module does.
static void *cmk_open(const char *path, ck_encrypt_fn *encrypt) {
	void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (lib == NULL) {
		return NULL;
	}
	ck_get_function_list_fn get = (ck_get_function_list_fn)dlsym(lib, "C_GetFunctionList");
	struct ck_function_list_head *list = NULL;
	if (get == NULL || get((void **)&list) != 0 || list == NULL || list->major < 2 || list->encrypt == NULL) {
		dlclose(lib);
		return NULL;
	}
	*encrypt = list->encrypt;
	return lib;
}

static ck_ulong cmk_encrypt(ck_encrypt_fn fn, ck_ulong session, unsigned char *data, ck_ulong len,
		unsigned char *out, ck_ulong *out_len) {
	return fn(session, data, len, out, out_len);
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// sizedEncrypter calls C_Encrypt with an output buffer of the caller's size. miekg/pkcs11 asks the module for the
// length first, and NSS's answer for AES-GCM leaves out the 16-byte tag, so its second call fails with
// CKR_BUFFER_TOO_SMALL; the output size of GCM is known (plaintext plus tag), so the engine passes that.
type sizedEncrypter struct {
	lib     unsafe.Pointer
	encrypt C.ck_encrypt_fn
}

func loadSizedEncrypter(path string) (sizedEncrypter, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var fn C.ck_encrypt_fn
	lib := C.cmk_open(cpath, &fn)
	if lib == nil {
		return sizedEncrypter{}, fmt.Errorf("cannot read the function list of PKCS#11 library %q", path)
	}
	return sizedEncrypter{lib: lib, encrypt: fn}, nil
}

// moduleCalls is the library's calls: miekg/pkcs11's, and C_Encrypt into a buffer of known size.
type moduleCalls struct {
	*pkcs11.Ctx
	sized sizedEncrypter
}

// EncryptSized is C_Encrypt with an output buffer of size bytes.
func (c moduleCalls) EncryptSized(sh pkcs11.SessionHandle, message []byte, size int) ([]byte, error) {
	out := make([]byte, max(size, 1))
	outLen := C.ck_ulong(size)
	in := message
	if len(in) == 0 {
		in = []byte{0} // a valid pointer with length 0: modules refuse a NULL pData
	}
	rv := C.cmk_encrypt(c.sized.encrypt, C.ck_ulong(sh), (*C.uchar)(unsafe.Pointer(&in[0])), C.ck_ulong(len(message)),
		(*C.uchar)(unsafe.Pointer(&out[0])), &outLen)
	if rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	if int(outLen) > size {
		return nil, pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL)
	}
	return out[:outLen], nil
}

// cString is a NUL-terminated copy in C memory, for values the library may read during the call.
type cString struct{ p *C.char }

func newCString(s string) cString     { return cString{C.CString(s)} }
func (c cString) ptr() unsafe.Pointer { return unsafe.Pointer(c.p) }
func (c cString) free()               { C.free(unsafe.Pointer(c.p)) }
