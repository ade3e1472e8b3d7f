// Package hsm talks PKCS#11 to the token that holds the engine's keys. It never returns secret key material and
// knows nothing of Vault.
//
// Its jobs, one file each:
//   - module.go: the library's lifetime, shared by every mount of the process, and the one gate every call
//     passes, which keeps calls out of the library while it is finalised and handles of a finished module
//     generation out of the new one;
//   - login.go: logins per token, and the brake on wrong PINs;
//   - listing.go: the tokens a fresh copy of the library lists, asked of a child process;
//   - pool.go: a Token's connection: slot, login session, pooled sessions;
//   - handles.go: object handles cached per key version, and objects found missing;
//   - recovery.go: what each PKCS#11 error means and the retry that recovers from it;
//   - observe.go: what the engine's metrics hear of every operation and recovery, and the health check;
//   - capabilities.go: what a token can do and how it must be asked, probed, never assumed from SoftHSM;
//   - templates.go: the attributes of every object the engine keeps;
//   - gcm.go, sign.go, rsa.go, random.go, generate.go, import.go, objects.go: the operations.
package hsm
