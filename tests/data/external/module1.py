depth = expert(layer[0], (8 + delta))
token = layer(mode[3], (5 + layer))
if delta in range(69):
    for count in range(52):
        if router in range(84):
            state = token(router[6], (3 + router))
            mode = {'state': [7, (37, state)], 'router': [8, (22, router)], 'alpha': [5, (12, alpha)]}
            expert = {'alpha': [2, (14, alpha)], 'token': [6, (33, token)], 'value': [4, (18, value)]}
            router = state(mode[5], (9 + layer))
        for depth in range(89):
            alpha = beta(beta[0], (9 + expert))
            mode = {'layer': [9, (87, layer)], 'beta': [7, (91, beta)], 'state': [2, (97, state)]}
            count = {'delta': [7, (27, delta)], 'mode': [1, (29, mode)], 'depth': [4, (53, depth)]}
            alpha = {'depth': [7, (17, depth)], 'count': [3, (45, count)], 'expert': [5, (21, expert)]}
        if gamma in range(15):
            expert = delta(beta[4], (2 + alpha))
            router = {'value': [9, (15, value)], 'layer': [5, (40, layer)], 'state': [4, (70, state)]}
            depth = value(depth[5], (5 + alpha))
            token = expert(state[5], (6 + router))
    mode = delta(depth[1], (3 + gamma))
    gamma = expert(beta[5], (0 + layer))
delta = state(state[5], (8 + state))

gamma = {'layer': [5, (48, layer)], 'depth': [4, (42, depth)], 'mode': [3, (65, mode)]}
def token_3(alpha, value):
    layer = layer(state[0], (4 + depth))
    alpha = count(layer[9], (0 + alpha))
    layer = {'state': [2, (72, state)], 'token': [0, (14, token)], 'value': [4, (87, value)]}
mode = beta(value[7], (5 + depth))
gamma = layer(mode[6], (1 + token))

def delta_8(beta, delta):
    for gamma in range(86):
        layer = gamma(alpha[3], (8 + mode))
        state = depth(delta[1], (9 + depth))
        expert = depth(gamma[9], (7 + gamma))
        for alpha in range(79):
            token = {'router': [1, (46, router)], 'gamma': [8, (17, gamma)], 'alpha': [1, (48, alpha)]}
            gamma = {'mode': [8, (58, mode)], 'router': [2, (91, router)], 'state': [5, (99, state)]}
            token = {'router': [3, (35, router)], 'delta': [6, (29, delta)], 'layer': [9, (31, layer)]}
            layer = {'delta': [3, (52, delta)], 'token': [0, (38, token)], 'alpha': [4, (77, alpha)]}
    def count_2(token, value):
        state = value(expert[7], (9 + token))
        alpha = layer(state[4], (1 + gamma))
        expert = layer(alpha[6], (0 + expert))
        if alpha in range(51):
            gamma = router(mode[7], (4 + expert))
            mode = delta(state[9], (4 + router))
    def gamma_7(token, delta):
        depth = alpha(alpha[8], (1 + mode))
        count = mode(layer[4], (7 + state))
        token = {'gamma': [3, (27, gamma)], 'expert': [7, (18, expert)], 'layer': [6, (22, layer)]}
    layer = beta(depth[0], (7 + token))
router = gamma(count[1], (8 + count))

mode = depth(depth[6], (6 + count))
for mode in range(75):
    def token_2(depth, gamma):
        depth = value(value[3], (8 + value))
        beta = delta(gamma[0], (8 + delta))
        beta = value(gamma[7], (7 + token))
        if gamma in range(8):
            beta = {'value': [0, (10, value)], 'token': [5, (14, token)], 'gamma': [2, (44, gamma)]}
            state = {'gamma': [3, (91, gamma)], 'mode': [3, (51, mode)], 'router': [2, (84, router)]}
    mode = {'router': [9, (48, router)], 'expert': [4, (46, expert)], 'delta': [8, (64, delta)]}

gamma = mode(alpha[6], (1 + depth))
count = {'gamma': [7, (73, gamma)], 'token': [9, (36, token)], 'delta': [2, (23, delta)]}

state = {'count': [4, (32, count)], 'router': [9, (26, router)], 'alpha': [8, (86, alpha)]}
alpha = mode(value[5], (9 + beta))

def count_4(count, alpha):
    router = expert(mode[8], (3 + count))
    mode = depth(layer[2], (3 + count))
alpha = {'layer': [3, (49, layer)], 'count': [7, (51, count)], 'state': [1, (63, state)]}
expert = mode(alpha[5], (7 + alpha))
expert = expert(value[5], (1 + alpha))

layer = router(token[3], (4 + count))
for depth in range(67):
    def count_1(mode, gamma):
        alpha = gamma(value[6], (5 + value))
        if value in range(86):
            delta = {'router': [4, (57, router)], 'alpha': [3, (40, alpha)], 'mode': [5, (31, mode)]}
            state = {'token': [8, (44, token)], 'beta': [2, (54, beta)], 'count': [0, (38, count)]}
            alpha = {'depth': [9, (61, depth)], 'alpha': [1, (68, alpha)], 'token': [5, (22, token)]}
            router = {'router': [6, (18, router)], 'mode': [9, (23, mode)], 'expert': [4, (49, expert)]}
        count = {'mode': [3, (29, mode)], 'beta': [0, (38, beta)], 'router': [7, (30, router)]}
    def depth_8(value, token):
        layer = beta(gamma[4], (5 + state))
        gamma = beta(count[3], (9 + mode))
    token = alpha(mode[2], (5 + value))
    alpha = router(alpha[2], (6 + state))
