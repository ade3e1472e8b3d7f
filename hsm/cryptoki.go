package hsm

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long ck_ulong;
typedef ck_ulong (*ck_encrypt_fn)(ck_ulong session, unsigned char *data, ck_ulong len, unsigned char *out, ck_ulong *out_len);
typedef ck_ulong (*ck_decrypt_fn)(ck_ulong session, unsigned char *data, ck_ulong len, unsigned char *out, ck_ulong *out_len);
typedef ck_ulong (*ck_get_function_list_fn)(void **list);

// CK_ATTRIBUTE, with the platform's default alignment as on every Unix.
typedef struct {
	ck_ulong type;
	void *value;
	ck_ulong value_len;
} ck_attribute;
typedef ck_ulong (*ck_create_object_fn)(ck_ulong session, ck_attribute *tmpl, ck_ulong count, ck_ulong *object);

// The head of CK_FUNCTION_LIST up to C_Decrypt, with the platform's default alignment as on every Unix: a
// CK_VERSION, then the functions in the standard's order, C_Initialize first; C_CreateObject is the 21st,
// C_Encrypt the 31st, C_Decrypt the 35th.
struct ck_function_list_head {
	unsigned char major, minor;
	void *before_create_object[20];
	ck_create_object_fn create_object;
	void *before_encrypt[9];
	ck_encrypt_fn encrypt;
	void *before_decrypt[3];
	ck_decrypt_fn decrypt;
};

struct cmk_functions {
	ck_encrypt_fn encrypt;
	ck_decrypt_fn decrypt;
	ck_create_object_fn create_object;
};

// cmk_open loads the library once more (the loader shares the copy miekg/pkcs11 holds) and finds the functions
// called here through C_GetFunctionList, as every PKCS#11 application must. It stays loaded for the life of the
// process, as the module does.
static void *cmk_open(const char *path, struct cmk_functions *fns) {
	void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (lib == NULL) {
		return NULL;
	}
	ck_get_function_list_fn get = (ck_get_function_list_fn)dlsym(lib, "C_GetFunctionList");
	struct ck_function_list_head *list = NULL;
	if (get == NULL || get((void **)&list) != 0 || list == NULL || list->major < 2 || list->encrypt == NULL ||
			list->decrypt == NULL || list->create_object == NULL) {
		dlclose(lib);
		return NULL;
	}
	fns->encrypt = list->encrypt;
	fns->decrypt = list->decrypt;
	fns->create_object = list->create_object;
	return lib;
}

static ck_ulong cmk_encrypt(ck_encrypt_fn fn, ck_ulong session, unsigned char *data, ck_ulong len,
		unsigned char *out, ck_ulong *out_len) {
	return fn(session, data, len, out, out_len);
}

static ck_ulong cmk_decrypt(ck_decrypt_fn fn, ck_ulong session, unsigned char *data, ck_ulong len,
		unsigned char *out, ck_ulong *out_len) {
	return fn(session, data, len, out, out_len);
}

static ck_ulong cmk_create_object(ck_create_object_fn fn, ck_ulong session, ck_attribute *tmpl, ck_ulong count,
		ck_ulong *object) {
	return fn(session, tmpl, count, object);
}
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// ownCalls are the library's functions that the engine calls itself rather than through miekg/pkcs11:
//   - C_Encrypt with an output buffer of the caller's size: miekg/pkcs11 asks the module for the length first, and
//     NSS's answer for AES-GCM leaves out the 16-byte tag, so its second call fails with CKR_BUFFER_TOO_SMALL; the
//     output size of GCM is known (plaintext plus tag), so the engine passes that.
//   - C_Decrypt and C_CreateObject, so that plaintext and key values never sit in C memory the engine cannot
//     wipe: miekg/pkcs11 decrypts into a buffer it allocates in C and frees without zeroing (and leaks when the
//     second call fails), and copies every template value into C memory freed the same way. Here a decryption
//     is written straight into the caller's Go buffer, and template values are zeroed before they are freed.
type ownCalls struct {
	lib unsafe.Pointer
	fns C.struct_cmk_functions
}

func loadOwnCalls(path string) (ownCalls, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var fns C.struct_cmk_functions
	lib := C.cmk_open(cpath, &fns)
	if lib == nil {
		return ownCalls{}, fmt.Errorf("cannot read the function list of PKCS#11 library %q", path)
	}
	return ownCalls{lib: lib, fns: fns}, nil
}

// moduleCalls is the library's calls: miekg/pkcs11's, and the engine's own (ownCalls).
type moduleCalls struct {
	*pkcs11.Ctx
	own ownCalls
}

// EncryptSized is C_Encrypt with an output buffer of size bytes.
func (c moduleCalls) EncryptSized(sh pkcs11.SessionHandle, message []byte, size int) ([]byte, error) {
	out := make([]byte, max(size, 1))
	outLen := C.ck_ulong(size)
	in := message
	if len(in) == 0 {
		in = []byte{0} // a valid pointer with length 0: modules refuse a NULL pData
	}
	rv := C.cmk_encrypt(c.own.fns.encrypt, C.ck_ulong(sh), (*C.uchar)(unsafe.Pointer(&in[0])), C.ck_ulong(len(message)),
		(*C.uchar)(unsafe.Pointer(&out[0])), &outLen)
	if rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	if int(outLen) > size {
		return nil, pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL)
	}
	return out[:outLen], nil
}

// Decrypt is C_Decrypt as miekg/pkcs11 makes it (the length first, then the decryption), written into Go memory
// that the caller owns and clears: no copy of the plaintext is left in C memory.
func (c moduleCalls) Decrypt(sh pkcs11.SessionHandle, ciphertext []byte) ([]byte, error) {
	in := ciphertext
	if len(in) == 0 {
		in = []byte{0}
	}
	var outLen C.ck_ulong
	rv := C.cmk_decrypt(c.own.fns.decrypt, C.ck_ulong(sh), (*C.uchar)(unsafe.Pointer(&in[0])), C.ck_ulong(len(ciphertext)), nil, &outLen)
	if rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	out := make([]byte, max(int(outLen), 1))
	rv = C.cmk_decrypt(c.own.fns.decrypt, C.ck_ulong(sh), (*C.uchar)(unsafe.Pointer(&in[0])), C.ck_ulong(len(ciphertext)),
		(*C.uchar)(unsafe.Pointer(&out[0])), &outLen)
	if rv != 0 {
		clear(out)
		return nil, pkcs11.Error(rv)
	}
	return out[:outLen], nil
}

// CreateObject is C_CreateObject with the template's values copied into C memory that is zeroed before it is
// freed (a template may hold a key's value). cgo forbids Go pointers inside memory passed to C, so the values
// cannot stay in Go memory.
func (c moduleCalls) CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if len(temp) == 0 {
		return 0, pkcs11.Error(pkcs11.CKR_TEMPLATE_INCOMPLETE)
	}
	attrs := (*C.ck_attribute)(C.calloc(C.size_t(len(temp)), C.size_t(unsafe.Sizeof(C.ck_attribute{}))))
	if attrs == nil {
		return 0, pkcs11.Error(pkcs11.CKR_HOST_MEMORY)
	}
	defer C.free(unsafe.Pointer(attrs))
	list := unsafe.Slice(attrs, len(temp))
	defer func() {
		for i := range list {
			if list[i].value == nil {
				continue
			}
			v := unsafe.Slice((*byte)(list[i].value), int(list[i].value_len))
			clear(v)
			if cValueWiped != nil {
				cValueWiped(temp[i].Type, v)
			}
			C.free(list[i].value)
		}
	}()
	for i, a := range temp {
		list[i]._type = C.ck_ulong(a.Type)
		if len(a.Value) == 0 {
			continue
		}
		p := C.malloc(C.size_t(len(a.Value)))
		if p == nil {
			return 0, pkcs11.Error(pkcs11.CKR_HOST_MEMORY)
		}
		copy(unsafe.Slice((*byte)(p), len(a.Value)), a.Value)
		list[i].value, list[i].value_len = p, C.ck_ulong(len(a.Value))
	}
	var obj C.ck_ulong
	if rv := C.cmk_create_object(c.own.fns.create_object, C.ck_ulong(sh), attrs, C.ck_ulong(len(temp)), &obj); rv != 0 {
		return 0, pkcs11.Error(rv)
	}
	return pkcs11.ObjectHandle(obj), nil
}

// cValueWiped, set by tests only, is shown each C copy of a template value once it is zeroed, before it is freed.
var cValueWiped func(attr uint, wiped []byte)

// cString is a NUL-terminated copy in C memory, for values the library may read during the call.
type cString struct{ p *C.char }

func newCString(s string) cString     { return cString{C.CString(s)} }
func (c cString) ptr() unsafe.Pointer { return unsafe.Pointer(c.p) }
func (c cString) free()               { C.free(unsafe.Pointer(c.p)) }
