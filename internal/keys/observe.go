package keys

import (
	"context"
	"time"
)

// Observer hears what the engine's metrics count of the keys: the key and operation each request's use asks for
// (Usable, which every use passes, before the door judges it), every denial by the condition that refused it, and
// every rotation once stored, by cause. It is called under no lock of the manager's and must not block.
type Observer interface {
	// Judging: a request (ctx) asks to use key name for op; k is its snapshot, nil when the key is not found.
	Judging(ctx context.Context, name string, op Operation, k *Key)
	Denied(name, condition string)
	Rotated(name, cause string)
	// Anomaly: a caller's use of key name was unusual (anomaly.go), of kind.
	Anomaly(name, kind string)
	// DeprecatedUse: a request (ctx) used a version of key name whose type t the mount deprecates since since.
	DeprecatedUse(ctx context.Context, name string, t Type, since time.Time)
}

// observer is m.Observer, or one that hears nothing.
func (m *Manager) observer() Observer {
	if m.Observer != nil {
		return m.Observer
	}
	return unobserved{}
}

type unobserved struct{}

func (unobserved) Judging(context.Context, string, Operation, *Key)       {}
func (unobserved) Denied(string, string)                                  {}
func (unobserved) Rotated(string, string)                                 {}
func (unobserved) Anomaly(string, string)                                 {}
func (unobserved) DeprecatedUse(context.Context, string, Type, time.Time) {}

// denied records a use the key's access conditions refused: the key's denial record and the observer.
func (m *Manager) denied(name, condition string) {
	m.denials.record(name, condition, m.now())
	m.observer().Denied(name, condition)
}
